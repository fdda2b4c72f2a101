"""Flax NNX models. They name axes logically and never see a mesh."""

from slimjax.models.decoder import ACTIVATION_AXES, Decoder, compute_dtype, param_axes

__all__ = ["ACTIVATION_AXES", "Decoder", "compute_dtype", "param_axes"]
