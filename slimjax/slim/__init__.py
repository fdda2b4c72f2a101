"""Slimming: the model spec (family + recipe of transforms) and the transforms themselves.

``spec`` builds any model a checkpoint can hold; ``transform`` is the protocol a slimming method
implements; ``select`` picks matrix layers by path patterns (per layer, also when scanned);
``lora`` is the first transform. ``sparse_store`` writes a compact (bitmask / 2:4) copy of pruned
parameters; ``report`` measures any run's weights, quality and speed, and compares two runs.
Nothing here imports ``slimjax.train``: the train step calls in.
"""
