"""Flax NNX models. They name axes logically and never see a mesh."""

from slimjax.models.decoder import ACTIVATION_AXES, Decoder, compute_dtype
from slimjax.models.encoder import Encoder
from slimjax.models.families import FAMILIES, abstract_params, param_axes

__all__ = ["ACTIVATION_AXES", "FAMILIES", "Decoder", "Encoder", "abstract_params", "compute_dtype", "param_axes"]
