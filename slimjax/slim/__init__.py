"""Slimming: the model spec (family + recipe of transforms) and the transforms themselves.

``spec`` builds any model a checkpoint can hold; ``transform`` is the protocol a slimming method
implements; ``select`` picks matrix layers by path patterns (per layer, also when scanned).
Transforms: ``lora`` (adapters), ``prune`` (masks as state: fixed, gradual, RigL, SET, L1),
``quant`` (stored integer weights) and ``qat`` (fake quantization while training).
Methods on trained weights: ``oneshot`` (magnitude / Wanda / SparseGPT, unstructured or N:M),
``structured`` (remove heads and MLP neurons: a smaller dense model), with the per-matrix math in
``pruning`` and ``quantize`` and the activation statistics they need from ``calibrate``.
``sparse_store`` writes a compact (bitmask / 2:4) copy of pruned parameters; ``report`` measures
any run's weights, quality and speed, and compares two runs.
Nothing here imports ``slimjax.train``: the train step calls in.
"""
