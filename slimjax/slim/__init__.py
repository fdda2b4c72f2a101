"""Slimming: the model spec (family + recipe of transforms) and the transforms themselves.

``spec`` builds any model a checkpoint can hold; ``transform`` is the protocol a slimming method
implements; ``select`` picks matrix layers by path patterns (per layer, also when scanned);
``lora`` is the first transform. Nothing here imports ``slimjax.train``: the train step calls in.
"""
