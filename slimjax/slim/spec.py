"""The model spec: a model family plus the ordered recipe of transforms, and what it builds.

Every consumer (train, resume, ``checkpoint.init_from``, eval, generate, export, import) builds
the model from a spec, and every checkpoint records the spec it was written with, so a
checkpoint whose parameter tree no longer follows from ``ModelConfig`` alone (LoRA adapters,
factored or quantized weights, pruned shapes) is still read back exactly.

``build(spec)`` runs the family constructor and each transform's ``rewrite`` under
``nnx.eval_shape``: the graphdef, every parameter's logical axes, abstract shapes and the
trainable flags come back without allocating. ``init_fn`` and ``rewrite_fn`` are the same code
with values, meant for ``jax.jit`` with ``out_shardings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import Config, ModelConfig, model_config_from
from slimjax.errors import SlimjaxError
from slimjax.models import FAMILIES, param_axes
from slimjax.sharding import tree_paths, tree_partition
from slimjax.slim.transform import LossTerm, Transform, UpdateContext

# Model keys that change how the model runs, not what its parameters are: a resumed or restored
# run may change them freely.
RUNTIME_KEYS = frozenset({"dtype", "remat", "attention"})
Recipe = tuple[tuple[str, Mapping[str, Any]], ...]


def _registry() -> dict[str, Callable[[Mapping[str, Any]], Transform]]:
    # Imported here: each transform module imports this one's neighbours, not the reverse.
    from slimjax.config import ClassifyConfig, DistillConfig, LoraConfig, LowRankConfig, PruneConfig, QatConfig, QuantConfig
    from slimjax.slim.classify import Classify
    from slimjax.slim.distill import Distill
    from slimjax.slim.lora import Lora
    from slimjax.slim.lowrank import LowRank
    from slimjax.slim.prune import Prune
    from slimjax.slim.quant import Qat, Quant

    def options(opts: Mapping[str, Any]) -> dict[str, Any]:
        tuples = {k: tuple(opts[k]) for k in ("targets", "layer_bits", "ranks", "classes") if k in opts}
        return {**opts, **tuples}

    return {"lora": lambda opts: Lora(LoraConfig(**options(opts))),
            "prune": lambda opts: Prune(PruneConfig(**options(opts))),
            "qat": lambda opts: Qat(QatConfig(**options(opts))),
            "quant": lambda opts: Quant(QuantConfig(**options(opts))),
            "lowrank": lambda opts: LowRank(LowRankConfig(**options(opts))),
            "distill": lambda opts: Distill(DistillConfig(**opts)),
            "classify": lambda opts: Classify(ClassifyConfig(**options(opts)))}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Family + model config + recipe ((transform name, options), ...): JSON-ready and comparable."""

    family: str
    model: ModelConfig
    recipe: Recipe = ()

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "model": dataclasses.asdict(self.model),
                "recipe": [[name, dict(opts)] for name, opts in self.recipe]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelSpec":
        recipe = tuple((name, _freeze(opts)) for name, opts in d.get("recipe", ()))
        return cls(d.get("family", "decoder"), model_config_from(d["model"]), recipe)

    def transforms(self) -> list[Transform]:
        registry = _registry()
        out = []
        for name, opts in self.recipe:
            if name not in registry:
                raise SlimjaxError(f"the model spec names transform '{name}', which this slimjax does not have")
            out.append(registry[name](dict(opts)))
        return out

    def difference(self, other: "ModelSpec") -> tuple[str, Any, Any] | None:
        """The first difference that changes the parameters (runtime keys ignored) as
        ``(key, this value, other value)``, or None."""
        if self.family != other.family:
            return "model family", self.family, other.family
        a, b = dataclasses.asdict(self.model), dataclasses.asdict(other.model)
        for key in sorted(a):
            if key not in RUNTIME_KEYS and a[key] != b.get(key):
                return f"model.{key}", a[key], b.get(key)
        if structure(self.recipe) != structure(other.recipe):
            return "slim.recipe", _describe(self.recipe), _describe(other.recipe)
        return None


def structure(recipe: Recipe) -> Recipe:
    """The recipe without each transform's runtime options (what the parameters and state depend on)."""
    registry = _registry()
    out = []
    for name, opts in recipe:
        runtime = registry[name](dict(opts)).runtime_options if name in registry else frozenset()
        out.append((name, tuple((k, v) for k, v in opts if k not in runtime)))
    return tuple(out)


def spec_from_config(cfg: Config) -> ModelSpec:
    """The spec a config asks for: ``model.family`` and ``slim.recipe`` with each transform's options."""
    registry = _registry()
    recipe = []
    for name in cfg.slim.recipe:
        opts = dataclasses.asdict(getattr(cfg.slim, name))
        recipe.append((name, _freeze(registry[name](opts).options())))
    return ModelSpec(cfg.model.family, cfg.model, tuple(recipe))


def spec_of(meta: Mapping[str, Any]) -> ModelSpec:
    """The model spec a checkpoint was written with (older checkpoints: the plain decoder of their config)."""
    if "spec" in meta:
        return ModelSpec.from_json(meta["spec"])
    from slimjax.config import from_saved

    return ModelSpec("decoder", from_saved(meta.get("config", {})).model)


def with_transform(spec: ModelSpec, transform: Transform) -> ModelSpec:
    """``spec`` with ``transform`` (and its options) appended to the recipe."""
    return dataclasses.replace(spec, recipe=(*spec.recipe, (transform.name, _freeze(transform.options()))))


def _freeze(opts: Mapping[str, Any]) -> Mapping[str, Any]:
    """Options as a hashable, order-independent mapping (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(opts).items()))


def _describe(recipe: Recipe) -> str:
    if not recipe:
        return "() (no transforms)"
    return "(" + ", ".join(f"{name}{dict(opts)}" for name, opts in recipe) + ")"


@dataclasses.dataclass(frozen=True)
class Built:
    """What a spec builds, abstractly: structure, logical axes, shapes, trainable flags, transforms."""

    spec: ModelSpec
    graphdef: nnx.GraphDef
    axes: dict
    shapes: dict
    trainable: dict  # same tree as shapes, bool leaves
    transforms: tuple[Transform, ...]
    dtype: Any

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) parts of a full parameter tree."""
        flags = dict(zip(tree_paths(self.trainable), jax.tree.leaves(self.trainable)))
        return tree_partition(params, lambda p: flags[p])

    def loss_terms(self) -> list[LossTerm]:
        return [term for t in self.transforms for term in t.loss_terms()]

    def objective_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The built-in terms' weights after every transform's adjustment, in recipe order."""
        for t in self.transforms:
            weights = t.objective_weights(dict(weights))
        return weights

    def view(self, params: dict, state: dict) -> dict:
        for t in self.transforms:
            params = t.view(params, state.get(t.name, {}))
        return params

    def after_update(self, params: dict, state: dict, ctx: UpdateContext) -> tuple[dict, dict]:
        for t in self.transforms:
            params, s = t.after_update(params, state.get(t.name, {}), ctx)
            if s:
                state = {**state, t.name: s}
        return params, state

    def masks(self, state: dict) -> dict[str, jax.Array]:
        """Every transform's masks by parameter path (a path masked twice gets both: their AND)."""
        out: dict[str, jax.Array] = {}
        for t in self.transforms:
            for path, m in t.masks(state.get(t.name, {})).items():
                out[path] = m & out[path] if path in out else m
        return out

    def state_axes(self) -> dict:
        return {t.name: ax for t in self.transforms if (ax := t.state_axes(self.axes))}

    def init_state(self, params: dict) -> dict:
        return {t.name: s for t in self.transforms if (s := t.init_state(params))}

    def load_state(self, state: dict, abstract: dict, mesh: Any, rules: Any, skip: frozenset[str] = frozenset()
                   ) -> dict:
        """``state`` with the parts transforms read from outside the run (a teacher) loaded into the
        shardings of ``abstract``; transforms named in ``skip`` keep theirs."""
        for t in self.transforms:
            if t.name not in skip and (loaded := t.load_state(abstract.get(t.name, {}), mesh, rules)) is not None:
                state = {**state, t.name: loaded}
        return state


def _rewrite_rngs(key: jax.Array, position: int) -> nnx.Rngs:
    """The keys of the transform at ``position`` in the recipe: the same whether it is applied at
    init or later to restored parameters, and apart from the family's init keys."""
    return nnx.Rngs(params=jax.random.fold_in(key, 1_000_003 + position))


def _construct(spec: ModelSpec, transforms: list[Transform], key: jax.Array, dtype: Any) -> nnx.Module:
    model = FAMILIES[spec.family](spec.model, rngs=nnx.Rngs(params=key), dtype=dtype)
    for i, t in enumerate(transforms):
        t.rewrite(model, _rewrite_rngs(key, i))
    return model


def build(spec: ModelSpec, dtype: Any = jnp.float32) -> Built:
    """The spec's model, abstractly (nothing allocated). Transform errors surface here."""
    if spec.family not in FAMILIES:
        raise SlimjaxError(f"model family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    transforms = spec.transforms()
    model = nnx.eval_shape(lambda: _construct(spec, transforms, jax.random.key(0), dtype))
    graphdef, _ = nnx.split(model)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flags = []
    for path in tree_paths(shapes):
        trainable = True
        for t in transforms:
            trainable = t.trainable(path, trainable)
        flags.append(trainable)
    trainable = jax.tree.unflatten(jax.tree.structure(shapes), flags)
    return Built(spec, graphdef, param_axes(model), shapes, trainable, tuple(transforms), dtype)


def init_fn(built: Built) -> Callable[[jax.Array], dict]:
    """``key -> full parameters`` of a fresh model (jit it with the parameters' out_shardings)."""
    transforms = list(built.transforms)

    def init(key: jax.Array) -> dict:
        model = _construct(built.spec, transforms, key, built.dtype)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return init


def rewrite_fn(source: Built, target: Built) -> Callable[[dict, jax.Array], dict]:
    """``(source params, key) -> target params``: applies the transforms the target's recipe adds
    to the source's (the source recipe must be a prefix of the target's)."""
    n = len(source.spec.recipe)
    if structure(target.spec.recipe[:n]) != structure(source.spec.recipe):
        raise SlimjaxError(f"cannot turn a model with slim recipe {_describe(source.spec.recipe)} into one with "
                           f"{_describe(target.spec.recipe)}: only transforms added after the source's can be applied")
    extra = list(target.transforms[n:])

    def rewrite(params: dict, key: jax.Array) -> dict:
        model = nnx.merge(source.graphdef, params)
        for i, t in enumerate(extra):
            t.rewrite(model, _rewrite_rngs(key, n + i))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return rewrite


def export_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of the exported model: transforms that bake into plain weights leave the recipe."""
    transforms = spec.transforms()
    keep: dict[int, bool] = {}

    def exported():
        model = _construct(spec, transforms, jax.random.key(0), jnp.float32)
        for i in reversed(range(len(transforms))):
            keep[i] = transforms[i].export(model)
        return nnx.state(model, nnx.Param)

    nnx.eval_shape(exported)  # shapes only: what matters is which transforms stay
    return dataclasses.replace(spec, recipe=tuple(e for i, e in enumerate(spec.recipe) if keep[i]))


def export_fn(built: Built) -> Callable[[dict], dict]:
    """``params -> exported params`` (adapters merged ...), matching :func:`export_spec`."""

    def export(params: dict) -> dict:
        model = nnx.merge(built.graphdef, params)
        for t in reversed(built.transforms):
            t.export(model)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return export


def abstract_fn(spec: ModelSpec) -> Callable[[ModelConfig, Any], tuple[nnx.GraphDef, dict, dict]]:
    """``(model config, dtype) -> (graphdef, axes, shapes)`` for this spec's recipe on another
    layout of the same model (the generator asks for the unrolled one)."""

    def abstract(model: ModelConfig, dtype: Any = jnp.float32):
        b = build(dataclasses.replace(spec, model=model), dtype)
        return b.graphdef, b.axes, b.shapes

    return abstract
