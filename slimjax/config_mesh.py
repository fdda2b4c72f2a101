"""Checks of the ``mesh`` section's pipeline and sequence-parallel keys against each other and the
model: split from ``slimjax.config`` (which calls them from its cross-field checks and re-exports
them; ``check_pipeline`` runs again once a stage axis of -1 is resolved against the devices)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimjax.errors import SlimjaxError

if TYPE_CHECKING:  # the dataclasses live in slimjax.config, which imports this module
    from slimjax.config import Config, MeshConfig, ModelConfig


def check_mesh_options(cfg: Config) -> None:
    """The pipeline keys against each other and the model; a stage axis of -1 (fill) is checked
    once the mesh is built (:func:`check_pipeline`)."""
    mesh = cfg.mesh
    if mesh.pipeline_microbatches < 0 or mesh.pipeline_repeats < 1:
        raise SlimjaxError(f"mesh.pipeline_microbatches must be >= 0 (0: one per stage) and mesh.pipeline_repeats "
                           f">= 1, got {mesh.pipeline_microbatches}, {mesh.pipeline_repeats}")
    if mesh.pipeline_schedule == "gpipe" and mesh.pipeline_repeats != 1:
        raise SlimjaxError(f"mesh.pipeline_repeats={mesh.pipeline_repeats} needs mesh.pipeline_schedule='circular' "
                           "(GPipe holds one group of layers per stage); set one or the other")
    if mesh.stage > 1:
        check_pipeline(mesh, mesh.stage, cfg.model, cfg.train.global_batch_size // cfg.train.microbatches)


def check_pipeline(mesh: MeshConfig, stages: int, model: ModelConfig, rows: int) -> None:
    """A pipeline of ``stages`` over ``model`` with ``rows`` rows per forward pass (the global batch
    over train.microbatches) must split the layers and the rows evenly."""
    if stages == 1:
        return
    if not model.scan_layers:
        raise SlimjaxError(f"mesh.stage={stages} pipelines the stacked layers; set model.scan_layers=True")
    groups = stages * (mesh.pipeline_repeats if mesh.pipeline_schedule == "circular" else 1)
    if model.n_layers % groups:
        what = (f"mesh.stage={stages} x mesh.pipeline_repeats={mesh.pipeline_repeats}"
                if groups != stages else f"mesh.stage={stages}")
        raise SlimjaxError(f"model.n_layers={model.n_layers} is not divisible by {what}; every stage holds the "
                           "same number of layers")
    micro = mesh.pipeline_microbatches or stages
    if rows % micro:
        raise SlimjaxError(f"mesh.pipeline_microbatches={micro} does not divide the {rows} rows of each step "
                           "(train.global_batch_size / train.microbatches); pick a divisor")


def check_sequence(cfg: Config) -> None:
    """Sequence parallelism: the axis must split data.seq_len (in 2 x sequence chunks when a decoder
    balances its causal work), and ring attention needs a layout its kernel can serve."""
    mesh, m, seq_len = cfg.mesh, cfg.model, cfg.data.seq_len
    if mesh.sequence <= 1:
        return
    balanced = mesh.sequence_balance and m.family == "decoder"  # only causal attention is unbalanced
    chunks = 2 * mesh.sequence if balanced else mesh.sequence
    if seq_len % chunks:
        how = (f"2 x mesh.sequence={chunks} chunks (mesh.sequence_balance=True)" if balanced
               else f"mesh.sequence={chunks} shards")
        raise SlimjaxError(f"data.seq_len={seq_len} cannot be split into {how}; make data.seq_len a multiple "
                           f"of {chunks}" + (" or set mesh.sequence_balance=False" if balanced else ""))
    if mesh.sequence_attention != "ring":
        return
    if m.attention == "cudnn":
        raise SlimjaxError("mesh.sequence_attention='ring' computes attention block by block with its own "
                           "kernel, not cuDNN's; set model.attention to 'auto' or 'xla', or use "
                           "mesh.sequence_attention='allgather'")
    if mesh.tensor > 1 and m.n_kv_heads % mesh.tensor:
        raise SlimjaxError(f"mesh.sequence_attention='ring' groups each device's query heads over its own "
                           f"key/value heads, so mesh.tensor={mesh.tensor} must divide model.n_kv_heads="
                           f"{m.n_kv_heads}; change one, or use mesh.sequence_attention='allgather'")
