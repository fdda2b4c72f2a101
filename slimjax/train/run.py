"""Assembles a run from a validated config: mesh, data, state (fresh or restored), compiled steps.

Everything here happens once, before the first step; ``slimjax.train.loop`` then only steps,
logs, evaluates and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.checkpoint import Checkpointer, resolve_source
from slimjax.config import Config, check_pipeline
from slimjax.data import finetune, loader, pipeline, tokenizer
from slimjax.data.tokenizer import Tokenizer
from slimjax.errors import SlimjaxError
from slimjax.infer.scoring import make_eval_step
from slimjax.models import compute_dtype
from slimjax.models.pipeline import Schedule, make_schedule, pipelined
from slimjax.sharding import BATCH_AXES, Rules, activation_rules, make_mesh
from slimjax.slim import classify
from slimjax.slim.spec import ModelSpec, build, rewrite_fn, spec_from_config, spec_of
from slimjax.train import optimizer as optim
from slimjax.train.metrics import SUMMARY_FILE
from slimjax.train.state import Setup, TrainState, init_state, make_setup, state_from_params
from slimjax.train.step import StepOptions, make_state_eval_step, make_train_step

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Run:
    """A ready-to-step run. Mutable only in ``state`` (replaced each step)."""

    cfg: Config
    workdir: str
    mesh: Mesh
    rules: Rules
    tok: Tokenizer
    train_data: Any  # grain.MapDataset of this process's local batches
    eval_data: list[dict[str, np.ndarray]]
    data_stats: dict[str, Any]  # documents and rows per source (this process's shards), skipped records
    batch_sharding: dict[str, NamedSharding]  # by batch array name
    setup: Setup
    state: TrainState
    start_step: int
    data_state: dict | None  # the data iterator's state at start_step (None: from the beginning)
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[TrainState, dict], dict]
    compile_seconds: float
    checkpointer: Checkpointer
    dtype: Any
    task: str = "lm"  # "lm", "classify" or "sft" (finetune.task_of)


def prepare_workdir(workdir: str) -> str:
    """Creates the workdir (or accepts an existing one); a file or unwritable path is an error."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SlimjaxError(f"--workdir '{workdir}' is a file; give a directory (new or from an earlier run)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SlimjaxError(f"cannot create --workdir '{workdir}': {e.strerror}") from None
    for sub in (path, os.path.join(path, CHECKPOINT_DIR)):
        if os.path.isdir(sub) and not os.access(sub, os.W_OK):
            raise SlimjaxError(f"--workdir '{workdir}' is not writable ({sub}); choose another directory "
                               "or fix its permissions")
    return path


def check_batch(cfg: Config, mesh: Mesh) -> None:
    """The global batch must split evenly over microbatches and batch-sharding devices."""
    t = cfg.train
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if t.global_batch_size % (ways * t.microbatches):
        raise SlimjaxError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by data x fsdp "
            f"({ways}) x train.microbatches ({t.microbatches}); pick a multiple of {ways * t.microbatches}")
    rows = t.global_batch_size // t.microbatches
    check_pipeline(cfg.mesh, mesh.shape["stage"], cfg.model, rows)  # mesh.stage may have been -1
    micro = pipeline_schedule(cfg, mesh)
    if micro is not None and (rows // micro.microbatches) % ways:
        raise SlimjaxError(
            f"a pipeline microbatch of {rows // micro.microbatches} rows (train.global_batch_size / "
            f"train.microbatches / mesh.pipeline_microbatches) cannot be split over data x fsdp ({ways}); "
            "use fewer pipeline microbatches or a larger batch")
    if t.global_batch_size % jax.process_count():
        raise SlimjaxError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                           f"{jax.process_count()} processes")


def build_run(cfg: Config, workdir: str) -> Run:
    """Everything before the first step. Everything that can be checked without the data (mesh,
    batch, rules, model spec) is checked before the workdir is created; a workdir this call
    created is removed again if anything later fails, so a failed start leaves nothing behind."""
    mesh = make_mesh(cfg.mesh)
    rules = Rules.from_config(cfg.mesh)
    check_batch(cfg, mesh)
    task = finetune.task_of(cfg)
    dtype = compute_dtype(cfg.model.dtype)
    tx = optim.make_optimizer(cfg.optimizer, cfg.train.steps)
    # The model spec (family + slim recipe) builds the model; it validates the rules against every
    # logical name and the transforms against the model before anything is written.
    setup = make_setup(spec_from_config(cfg), dtype, tx, rules, mesh)

    created = not os.path.exists(os.path.abspath(os.path.expanduser(workdir)))
    workdir = prepare_workdir(workdir)
    try:
        share_tokenizer(cfg, workdir)
        if task == "lm":
            data = loader.build(cfg.data, cfg.train.global_batch_size, cfg.train.seed, cfg.train.eval_batches,
                                cfg.model.vocab_size, workdir, jax.process_index(), jax.process_count(),
                                pretrain=cfg.pretrain if cfg.model.family == "encoder" else None)
        else:
            data = finetune.build(cfg, task, workdir, jax.process_index(), jax.process_count())

        checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint)
        state, start, data_state = restore_or_init(checkpointer, setup, cfg, rules, mesh)

        spec = batch_spec(cfg)
        batch_sharding = pipeline.batch_shardings(mesh, rules, spec)
        train_step, eval_step, compile_s = compile_steps(cfg, setup, mesh, rules, batch_sharding, spec)
    except BaseException:
        if created and jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)  # only what this call made (a bad data source ...)
        raise
    return Run(cfg=cfg, workdir=workdir, mesh=mesh, rules=rules, tok=data.tokenizer, train_data=data.train,
               eval_data=data.eval, data_stats=data.stats, batch_sharding=batch_sharding, setup=setup, state=state,
               start_step=start, data_state=data_state, train_step=train_step, eval_step=eval_step, compile_seconds=compile_s,
               checkpointer=checkpointer, dtype=dtype, task=task)


def finished_summary(cfg: Config, workdir: str) -> tuple[int, dict] | None:
    """(step, saved summary) when ``workdir`` holds a run of this config's model that already
    reached ``train.steps`` and wrote its summary; None otherwise (also for a new workdir).
    Reads only: a finished run is left byte for byte as it was."""
    path = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir, summary_path = os.path.join(path, CHECKPOINT_DIR), os.path.join(path, SUMMARY_FILE)
    if not (os.path.isdir(ckpt_dir) and os.path.isfile(summary_path)):
        return None
    checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint, read_only=True)
    try:
        step = checkpointer.latest_step()
        # A run that stopped early is complete too (its last checkpoint says so).
        if step is None or (step < cfg.train.steps and not checkpointer.read_meta(step).get(
                "early_stop", {}).get("stopped")):
            return None
        check_same_model(checkpointer, step, spec_from_config(cfg), cfg)
    finally:
        checkpointer.close()
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None  # an unreadable summary is rewritten by the normal path
    return (step, summary) if summary.get("final_step") == step else None


def share_tokenizer(cfg: Config, workdir: str) -> None:
    """Multi-process runs that train their SentencePiece model: process 0 alone trains it (or reads
    the workdir's cached one) and sends the bytes to the others, so every host tokenizes alike and
    only one writes. A host whose workdir is not shared writes the received copy into its own cache.
    (A prepared directory carries the model its rows were made with: nothing to share.)"""
    d = cfg.data
    if jax.process_count() == 1 or d.tokenizer_kind != "sentencepiece" or d.tokenizer or loader.is_prepared(d):
        return
    from jax.experimental import multihost_utils

    cached = tokenizer.cached_model_path(workdir)
    payload = np.zeros(0, np.uint8)
    if jax.process_index() == 0:
        tokenizer.get_tokenizer(d.tokenizer_kind, "", workdir, cfg.model.vocab_size, d.tokenizer_type,
                                lambda: loader.training_documents(d))
        payload = np.frombuffer(cached.read_bytes(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
    buf = np.zeros(size, np.uint8)
    buf[:payload.size] = payload
    model = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()
    if jax.process_index() != 0 and not (cached.exists() and cached.read_bytes() == model):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{jax.process_index()}.tmp")
        tmp.write_bytes(model)
        os.replace(tmp, cached)  # atomic: a reader never sees half a model


def restore_or_init(checkpointer: Checkpointer, setup: Setup, cfg: Config, rules: Rules, mesh: Mesh
                    ) -> tuple[TrainState, int, dict | None]:
    """(state, step, data iterator state): the latest checkpoint if the workdir has one (its model
    spec checked against the config's), else a fresh init at step 0 (with
    ``checkpoint.init_from``'s params if set).

    The shardings in ``setup.abstract`` are the target: a checkpoint written on another mesh or
    device count is resharded while it is read.
    """
    step = checkpointer.latest_step()
    if step is None:
        carried: frozenset[str] = frozenset()
        if cfg.checkpoint.init_from:
            state, carried = state_from_source(cfg.checkpoint.init_from, setup, cfg, rules, mesh)
        else:
            state = init_state(setup, cfg.train.seed)
        # Transform state read from outside the run (a distillation teacher), unless the source carried it.
        slim = setup.built.load_state(state.slim, setup.abstract.slim, mesh, rules, skip=carried)
        return dataclasses.replace(state, slim=slim), 0, None
    check_same_model(checkpointer, step, setup.spec, cfg)
    restored, data_state, _ = checkpointer.restore(step, setup.abstract.as_dict())
    return TrainState(**restored), step, data_state


def check_same_model(checkpointer: Checkpointer, step: int, spec: ModelSpec, cfg: Config) -> None:
    """A checkpoint continues only under the model spec and optimizer it was written with."""
    meta = checkpointer.read_meta(step)
    where = f"checkpoint {checkpointer.directory}/{step}"
    changed = spec_of(meta).difference(spec)
    saved_opt = meta.get("config", {}).get("optimizer", {}).get("name", cfg.optimizer.name)
    if changed is None and saved_opt != cfg.optimizer.name:
        changed = ("optimizer.name", saved_opt, cfg.optimizer.name)  # a different optimizer state layout
    if changed:
        key, saved, now = changed
        raise SlimjaxError(f"{where} was written with {key}={saved!r}, the config now says {now!r}; use a new "
                           "--workdir (or checkpoint.init_from to start from its params)")


def state_from_source(source: str, setup: Setup, cfg: Config, rules: Rules, mesh: Mesh
                      ) -> tuple[TrainState, frozenset[str]]:
    """A step-0 state from another run's parameters (``checkpoint.init_from``), in this run's
    shardings, and the names of the transforms whose state came from the source.

    The source's own model spec builds its parameters; transforms this run's recipe adds to the
    source's (LoRA on an imported model) are then applied on the mesh by one jitted rewrite.
    """
    directory, step = resolve_source(source)
    if not os.path.isdir(directory):
        raise SlimjaxError(f"checkpoint.init_from='{source}' is not a directory; give a run directory, its "
                           "checkpoints/ directory or checkpoints/STEP")
    other = Checkpointer(directory, cfg.checkpoint, read_only=True)
    try:
        step = other.latest_step() if step is None else step
        if step is None or step not in other.all_steps():
            raise SlimjaxError(f"checkpoint.init_from='{source}' holds no complete checkpoint"
                               + ("" if step is None else f" for step {step}"))
        # The source's recipe on this run's model config: a checkpoint of another shape then fails
        # while its parameters are read, naming the first parameter that differs.
        source = spec_of(other.read_meta(step))
        if source.family != setup.spec.family:
            raise SlimjaxError(f"checkpoint.init_from='{source}' holds a {source.family!r} model, the config asks "
                               f"for a {setup.spec.family!r}")
        spec = dataclasses.replace(setup.spec, recipe=source.recipe)
        source_built = build(spec, setup.built.dtype)
        shardings = rules.tree_shardings(source_built.axes, source_built.shapes, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                source_built.shapes, shardings)
        params = other.restore_params(step, abstract)
        rewrite = rewrite_fn(source_built, setup.built)  # a clear error when the recipes do not extend
        # The source's transform state (pruning masks) carries over to the same transforms here.
        saved_slim = other.restore_slim(step, {name: setup.abstract.slim[name] for name in source_built.state_axes()})
    finally:
        other.close()

    def start(params, slim, key):
        state = state_from_params(setup, rewrite(params, key), key)
        return dataclasses.replace(state, slim={**state.slim, **(slim or {})})

    state = jax.jit(start, out_shardings=setup.shardings)(params, saved_slim, jax.random.key(cfg.train.seed))
    return state, frozenset(saved_slim or {})


def compile_steps(cfg: Config, setup: Setup, mesh: Mesh, rules: Rules, batch_sharding: dict[str, NamedSharding],
                  batch_spec: pipeline.BatchSpec = pipeline.LM_BATCH):
    """AOT-compiles the train step (state donated) and the eval step for batches of ``batch_spec``
    (named arrays sharded by their logical names); returns them and the seconds taken."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sizes = {"batch": cfg.train.global_batch_size, "length": cfg.data.seq_len}
    abstract_batch = pipeline.abstract_batch(batch_spec, sizes, batch_sharding)
    lr = optim.schedule(cfg.optimizer, cfg.train.steps)
    opts = step_options(cfg)
    step_fn = make_train_step(setup.built, setup.tx, lr, opts)
    t0 = time.perf_counter()
    # Constraints and the pipeline (mesh.stage > 1) are resolved while tracing.
    with activation_rules(mesh, rules), pipelined(pipeline_schedule(cfg, mesh)):
        train_step = jax.jit(step_fn, in_shardings=(setup.shardings, batch_sharding),
                             out_shardings=(setup.shardings, replicated), donate_argnums=0,
                             ).lower(setup.abstract, abstract_batch).compile()
        head = classify.head_of(setup.built)
        eval_fn = make_state_eval_step(setup.built, make_eval_step(setup.graphdef, setup.spec.family) if head is None
                                       else classify.make_eval_step(setup.graphdef, head))
        eval_step = jax.jit(eval_fn, in_shardings=(setup.shardings, batch_sharding),
                            out_shardings=replicated).lower(setup.abstract, abstract_batch).compile()
    return train_step, eval_step, time.perf_counter() - t0


def pipeline_schedule(cfg: Config, mesh: Mesh) -> Schedule | None:
    """The pipeline schedule of ``cfg`` on ``mesh`` (None when mesh.stage is 1)."""
    m = cfg.mesh
    return make_schedule(m.pipeline_schedule, mesh.shape["stage"], m.pipeline_microbatches, m.pipeline_repeats)


def step_options(cfg: Config) -> StepOptions:
    """The train step's options: microbatches, objective weights, non-finite policy."""
    weights = tuple(dataclasses.asdict(cfg.objective).items())
    return StepOptions(cfg.train.microbatches, weights, skip_nonfinite=cfg.train.nonfinite == "skip")


def batch_spec(cfg: Config) -> pipeline.BatchSpec:
    """The arrays of the run's batches: labelled rows for a classifier, else its family's."""
    return pipeline.CLASSIFY_BATCH if "classify" in cfg.slim.recipe else loader.BATCH_SPECS[cfg.model.family]


def fresh_state(cfg: Config, mesh: Mesh) -> tuple[Rules, Setup, TrainState]:
    """(rules, setup, freshly initialised sharded state) for ``cfg`` on ``mesh``."""
    rules = Rules.from_config(cfg.mesh)
    dtype = compute_dtype(cfg.model.dtype)
    setup = make_setup(spec_from_config(cfg), dtype, optim.make_optimizer(cfg.optimizer, cfg.train.steps), rules, mesh)
    state = init_state(setup, cfg.train.seed)
    return rules, setup, dataclasses.replace(state, slim=setup.built.load_state(state.slim, setup.abstract.slim, mesh,
                                                                                  rules))


def build_fresh(cfg: Config, mesh: Mesh) -> tuple[Setup, TrainState, Callable, Callable, dict[str, NamedSharding]]:
    """(setup, fresh state, compiled train step, compiled eval step, batch sharding) without data
    or checkpoints: what benchmarks and tests need to drive steps on batches of their own."""
    rules, setup, state = fresh_state(cfg, mesh)
    spec = batch_spec(cfg)
    batch_sharding = pipeline.batch_shardings(mesh, rules, spec)
    train_step, eval_step, _ = compile_steps(cfg, setup, mesh, rules, batch_sharding, spec)
    return setup, state, train_step, eval_step, batch_sharding
