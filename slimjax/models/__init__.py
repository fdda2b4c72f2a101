"""Flax NNX models. They name axes logically and never see a mesh."""

from slimjax.models.decoder import ACTIVATION_AXES, FAMILIES, Decoder, abstract_params, compute_dtype, param_axes

__all__ = ["ACTIVATION_AXES", "FAMILIES", "Decoder", "abstract_params", "compute_dtype", "param_axes"]
