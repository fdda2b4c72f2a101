"""Knowledge distillation (Hinton et al. 2015): a teacher's outputs as loss terms of the student's step.

The teacher is transform state, not a parameter: its weights, as its own loss saw them and with
its transforms baked in (``export_spec``: LoRA merged, masks applied), are read from its run when
the student starts fresh, sharded by the student's rules on the student's mesh, saved in every
student checkpoint (so a resumed run no longer needs the teacher's directory) and never updated.
Its forward pass runs inside the student's jitted step, once per (micro)batch however many terms
read it (``Outputs.shared``), with its parameters behind ``stop_gradient``.

Terms, each weighted by its ``slim.distill`` key and logged as ``terms/<name>``; per target token,
with ``z_s``, ``z_t`` the student's and teacher's logits:

- ``kd`` (weight ``alpha``): ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``. The soft targets'
  gradient shrinks as ``1/T^2``; the factor keeps its scale independent of T, so alpha means the
  same at any temperature. With ``top_k`` the teacher's distribution is its k most likely tokens,
  renormalised, and the student's log-probabilities are read at those tokens. The hard-label
  next-token loss is scaled by ``1 - alpha``.
- ``mse_probs`` (beta) and ``mse_logits`` (gamma): the mean over the vocabulary of
  ``(softmax(z_s/T) - softmax(z_t/T))^2`` and of ``(z_s - z_t)^2``.
- ``hidden``: the mean over the teacher's width of ``(h_s P - h_t)^2`` between the last hidden
  states (after the final norm); P is a learned ``[d_student, d_teacher]`` projection, a student
  parameter (``distill_proj``, dropped on export), when the widths differ, else the identity.

Students are made from the teacher by :func:`fewer_layers` (evenly spaced teacher layers), by
structured pruning (``slimjax prune --heads/--mlp``), or are any run sharing the teacher's
tokenizer (a pruned, quantized or factorised copy: distillation as their recovery step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from slimjax.checkpoint import Checkpointer, reading_config, resolve_source
from slimjax.config import DistillConfig
from slimjax.errors import SlimjaxError
from slimjax.infer.scoring import forward_features
from slimjax.models import compute_dtype
from slimjax.sharding import Rules
from slimjax.slim.spec import Built, ModelSpec, build, export_fn, export_spec, spec_of
from slimjax.slim.transform import LossTerm, Outputs, Transform

TEACHER = "teacher"  # the transform state's key for the teacher's parameters
PROJ = "distill_proj"  # the student parameter projecting its hidden state to the teacher's width
TERMS = ("kd", "mse_probs", "mse_logits", "hidden")  # loss-term names, weighted by alpha, ..., hidden


# ---- the losses, per token, in float32 ------------------------------------------------------------

def kd_per_token(z_s: jax.Array, z_t: jax.Array, temperature: float, top_k: int = 0) -> jax.Array:
    """``T^2 * KL(p_t || p_s)`` of the temperature-softened distributions, ``[..., V] -> [...]``."""
    t = float(temperature)
    log_q = jax.nn.log_softmax(z_s.astype(jnp.float32) / t, axis=-1)
    z_t = z_t.astype(jnp.float32) / t
    if top_k:
        z_t, ids = jax.lax.top_k(z_t, top_k)
        log_q = jnp.take_along_axis(log_q, ids, axis=-1)
    log_p = jax.nn.log_softmax(z_t, axis=-1)
    return t * t * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def mse_probs_per_token(z_s: jax.Array, z_t: jax.Array, temperature: float) -> jax.Array:
    """Mean over the vocabulary of ``(softmax(z_s/T) - softmax(z_t/T))^2``."""
    p_s = jax.nn.softmax(z_s.astype(jnp.float32) / temperature, axis=-1)
    p_t = jax.nn.softmax(z_t.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(jnp.square(p_s - p_t), axis=-1)


def mse_per_token(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over the last axis of ``(a - b)^2`` (logits, or projected hidden states)."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


# ---- the teacher ----------------------------------------------------------------------------------

def _open(source: str) -> tuple[Checkpointer, int]:
    directory, step = resolve_source(source)
    if not os.path.isdir(directory):
        raise SlimjaxError(f"slim.distill.teacher='{source}' is not a run directory; give the teacher's run "
                           "(written by slimjax train or slimjax import)")
    ckpt = Checkpointer(directory, reading_config(), read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
        ckpt.close()
        raise SlimjaxError(f"slim.distill.teacher='{source}' holds no complete checkpoint")
    return ckpt, step


def teacher_spec_of(source: str) -> ModelSpec:
    """The model spec of the teacher as the student sees it: its run's spec with every transform
    that bakes into plain weights baked in."""
    ckpt, step = _open(source)
    try:
        return export_spec(spec_of(ckpt.read_meta(step)))
    finally:
        ckpt.close()


def load_teacher(source: str, teacher: Built, abstract: dict, mesh: Mesh, rules: Rules) -> dict:
    """The teacher's parameters (its view, exported) in the shardings of ``abstract``, read from its
    run's checkpoint and computed on the mesh by one jitted program."""
    ckpt, step = _open(source)
    try:
        built = build(spec_of(ckpt.read_meta(step)), teacher.dtype)
        changed = export_spec(built.spec).difference(teacher.spec)
        if changed:
            key, was, now = changed
            raise SlimjaxError(f"slim.distill.teacher='{source}' has {key}={was!r}, but this run was set up for a "
                               f"teacher with {now!r}; point it at the teacher it was started with")
        shardings = rules.tree_shardings(built.axes, built.shapes, mesh)
        params = ckpt.restore_params(step, _with_shardings(built.shapes, shardings))
        slim = None
        if state_axes := built.state_axes():
            slim_abs = jax.eval_shape(built.init_state, built.shapes)
            slim = ckpt.restore_slim(step, _with_shardings(slim_abs, rules.tree_shardings(state_axes, slim_abs, mesh)))
    finally:
        ckpt.close()
    out = jax.tree.map(lambda a: a.sharding, abstract)
    to_teacher = lambda p, s: export_fn(built)(built.view(p, s or {}))  # noqa: E731
    return jax.jit(to_teacher, out_shardings=out)(params, slim)


def _projected(params: dict, hidden: jax.Array) -> jax.Array:
    """The student's hidden state in the teacher's width (through ``distill_proj`` when widths differ)."""
    return hidden @ params[PROJ].astype(hidden.dtype) if PROJ in params else hidden


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


# ---- the transform --------------------------------------------------------------------------------

class Distill(Transform):
    """The teacher as state, its outputs as loss terms; see the module docstring."""

    name = "distill"
    # Where the teacher is read from and how the terms are weighted do not change the parameters or
    # the state: a run may resume (or restart from a checkpoint) with other values.
    runtime_options = frozenset({"teacher", "temperature", "alpha", "mse_probs", "mse_logits", "top_k"})

    def __init__(self, cfg: DistillConfig):
        if not cfg.teacher_spec:  # recorded once, so a resumed run builds without the teacher's directory
            spec = teacher_spec_of(cfg.teacher)
            cfg = dataclasses.replace(cfg, teacher_spec=json.dumps(spec.to_json(), sort_keys=True))
        self.cfg = cfg

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    @functools.cached_property
    def teacher(self) -> Built:
        """The teacher's model, abstractly, in its own compute dtype."""
        spec = ModelSpec.from_json(json.loads(self.cfg.teacher_spec))
        return build(spec, compute_dtype(spec.model.dtype))

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        student, teacher = model.cfg, self.teacher.spec.model
        if student.vocab_size != teacher.vocab_size:
            raise SlimjaxError(f"the teacher ({self.cfg.teacher or 'slim.distill.teacher_spec'}) has vocab_size "
                               f"{teacher.vocab_size}, the student {student.vocab_size}: student and teacher must "
                               "share the tokenizer")
        if self.cfg.hidden and student.d_model != teacher.d_model:
            std = 1.0 / math.sqrt(student.d_model)
            value = std * jax.random.normal(rngs.params(), (student.d_model, teacher.d_model), jnp.float32)
            setattr(model, PROJ, nnx.Param(value, axes=("embed", None)))

    def state_axes(self, axes: dict) -> dict:
        return {TEACHER: self.teacher.axes}

    def init_state(self, params: dict) -> dict:
        # Placeholders of the teacher's shapes: load_state fills them at a fresh start, a restore
        # overwrites them from the student's checkpoint.
        return {TEACHER: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.teacher.shapes)}

    def load_state(self, abstract: dict, mesh: Mesh, rules: Rules) -> dict:
        return {TEACHER: load_teacher(self.cfg.teacher, self.teacher, abstract[TEACHER], mesh, rules)}

    def objective_weights(self, weights: dict[str, float]) -> dict[str, float]:
        return {**weights, "next_token": weights.get("next_token", 1.0) * (1.0 - self.cfg.alpha)}

    def loss_terms(self) -> list[LossTerm]:
        c = self.cfg
        weights = dict(zip(TERMS, (c.alpha, c.mse_probs, c.mse_logits, c.hidden)))
        # Per target token, from the student's parameters and outputs and the teacher's outputs.
        values = {
            "kd": lambda p, s, t: kd_per_token(s.logits, t.logits, c.temperature, c.top_k),
            "mse_probs": lambda p, s, t: mse_probs_per_token(s.logits, t.logits, c.temperature),
            "mse_logits": lambda p, s, t: mse_per_token(s.logits, t.logits),
            "hidden": lambda p, s, t: mse_per_token(_projected(p, s.hidden), t.hidden),
        }

        def term(name):
            def fn(params: dict, state: dict, batch: dict, out: Outputs) -> jax.Array:
                teacher = out.shared(self.name, lambda: self._teacher_outputs(state, batch))
                return jnp.sum(values[name](params, out, teacher) * batch["loss_mask"])
            return LossTerm(name, weights[name], fn, per_token=True)

        return [term(name) for name in TERMS if weights[name]]

    def _teacher_outputs(self, state: dict, batch: dict) -> Outputs:
        params = jax.lax.stop_gradient(state[self.name][TEACHER])
        hidden, logits = forward_features(self.teacher.graphdef, params, batch)
        return Outputs(logits, hidden)

    def export(self, model: nnx.Module) -> bool:
        if hasattr(model, PROJ):  # a training-only parameter
            delattr(model, PROJ)
        return False


# ---- students made from the teacher ---------------------------------------------------------------

def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``n_layers``, first and last included (DistilBERT keeps every other)."""
    if not 0 < keep <= n_layers:
        raise SlimjaxError(f"a student with {keep} layers cannot be taken from a teacher with {n_layers}; give "
                           f"1..{n_layers}")
    if keep == 1:
        return [n_layers - 1]
    return sorted({int(math.floor(i * (n_layers - 1) / (keep - 1) + 0.5)) for i in range(keep)})


def fewer_layers(spec: ModelSpec, params: dict, keep: int, mesh: Mesh, rules: Rules) -> tuple[ModelSpec, dict]:
    """(spec, params) of a student with ``keep`` of the teacher's layers (evenly spaced), every other
    weight copied; computed on the mesh in the student's shardings."""
    if spec.recipe:
        raise SlimjaxError(f"a fewer-layer student needs a plain teacher; this one has slim recipe "
                           f"{[n for n, _ in spec.recipe]} (export it first)")
    index = evenly_spaced(spec.model.n_layers, keep)
    small = dataclasses.replace(spec, model=dataclasses.replace(spec.model, n_layers=keep))
    built = build(small)

    def pick(p: dict) -> dict:
        if spec.model.scan_layers:
            blocks = jax.tree.map(lambda x: x[np.asarray(index)], p["blocks"])
        else:
            blocks = {i: p["blocks"][j] for i, j in enumerate(index)}
        return {**p, "blocks": blocks}

    out = rules.tree_shardings(built.axes, built.shapes, mesh)
    return small, jax.jit(pick, out_shardings=out)(params)
