"""The Python API for using a trained (or imported, pruned, quantized) run from a notebook or script.

    import slimjax
    run = slimjax.load_run("runs/tiny")                 # latest checkpoint, the run's own tokenizer
    run.logits("ROMEO:")                                # [tokens, vocab] float32, BOS included
    slimjax.generate(run, ["ROMEO:"], max_new_tokens=20)
    slimjax.evaluate(run)                               # loss, perplexity, bits per byte (held out)
    slimjax.evaluate_classifier(run)                    # a slim.classify run: accuracy, macro-F1, majority baseline
    print(run.explain())                                # where every parameter lives on the mesh

A run is read exactly as the ``slimjax eval`` and ``generate`` commands read it
(``slimjax.cli.rundir.open_run``): the model is built from the checkpoint's spec, so LoRA
adapters and other transforms come back as they were trained, and every parameter is sharded by
the run's rules table on its mesh (or on the mesh given).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.cli.rundir import RunDir, open_run, run_tokenizer
from slimjax.config import Config, DataConfig, SourceConfig, parse_source, validate
from slimjax.data import pipeline
from slimjax.data.tokenizer import Tokenizer
from slimjax.errors import SlimjaxError
from slimjax.infer import evaluate as evaluation
from slimjax.infer.generate import Generator, complete
from slimjax.infer.sampling import Sampling
from slimjax.infer.scoring import forward
from slimjax import sharding
from slimjax.sharding import BATCH_AXES, Rules, activation_rules
from slimjax.slim import classify
from slimjax.slim.spec import ModelSpec, abstract_fn, build, spec_from_config
from slimjax.tables import Table


@dataclasses.dataclass
class LoadedRun:
    """One checkpoint of a run, ready to use: config, model spec, graphdef, sharded parameters
    (the model's own tree, as ``nnx.merge(graphdef, params)`` takes it) and tokenizer."""

    rundir: RunDir
    tokenizer: Tokenizer

    @functools.cached_property
    def params(self) -> dict:
        """The checkpoint's parameters, each sharded by the rules on the mesh (read on first use,
        so a bad evaluation request fails before the model is loaded)."""
        return self.rundir.restore_params()

    @property
    def workdir(self) -> str:
        return self.rundir.workdir

    @property
    def step(self) -> int:
        return self.rundir.step

    @property
    def config(self) -> Config:
        return self.rundir.cfg

    @property
    def spec(self) -> ModelSpec:
        return self.rundir.spec

    @property
    def graphdef(self) -> Any:
        return self.rundir.built.graphdef

    @property
    def mesh(self) -> Mesh:
        return self.rundir.mesh

    @property
    def rules(self) -> Rules:
        return self.rundir.rules

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after BOS, as training and generation see a document's start."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode_batch([text])[0]]

    def logits(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]]) -> np.ndarray | list[np.ndarray]:
        """Next-token logits (float32 numpy) of a text (encoded after BOS), a list of token ids, or
        a list of either: one ``[length, vocab]`` array per input (a single input gives one array)."""
        single = isinstance(inputs, str) or (len(inputs) > 0 and all(isinstance(i, (int, np.integer)) for i in inputs))
        rows = [inputs] if single else list(inputs)
        if not rows:
            raise SlimjaxError("logits() needs at least one text or list of token ids")
        ids = [self.encode(r) if isinstance(r, str) else [int(t) for t in r] for r in rows]
        longest = max(len(r) for r in ids)
        if min(len(r) for r in ids) == 0 or longest > self.config.model.max_seq_len:
            raise SlimjaxError(f"each input must have 1..model.max_seq_len={self.config.model.max_seq_len} "
                               f"tokens; got lengths {[len(r) for r in ids]}")
        ways = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        batch = -(-len(ids) // ways) * ways  # rows padded to split evenly over the batch axes
        host = {k: np.zeros((batch, longest), np.int32) for k in ("inputs", "positions", "segment_ids")}
        for row, r in enumerate(ids):
            # Right padding in segment 0: causal attention keeps it out of the real tokens' logits.
            host["inputs"][row, :len(r)] = r
            host["positions"][row, :len(r)] = np.arange(len(r))
            host["segment_ids"][row, :len(r)] = 1
        row_sharding = NamedSharding(self.mesh, self.rules.spec(("batch", "length")))
        placed = {k: jax.make_array_from_callback(v.shape, row_sharding, lambda idx, v=v: v[idx]) for k, v in host.items()}
        out = np.asarray(jax.device_get(self._forward(self.params, placed)))
        arrays = [out[row, :len(r)] for row, r in enumerate(ids)]
        return arrays[0] if single else arrays

    @functools.cached_property
    def _forward(self):
        """The jitted forward pass on the run's mesh (compiled once per batch shape)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def logits(params, batch):
            # Inputs of any length: the length is not split over the sequence axis here.
            with activation_rules(self.mesh, self.rules.replicating("act_length")):
                return forward(self.graphdef, params, batch).astype(jnp.float32)

        return jax.jit(logits, in_shardings=(self.rundir.shardings(), None), out_shardings=replicated)

    @functools.cached_property
    def generator(self) -> Generator:
        """The KV-cache generator over these parameters (compiled programs are kept between calls)."""
        if self.spec.family != "decoder":
            raise SlimjaxError(f"run '{self.rundir.workdir}' holds a model of family {self.spec.family!r}, which "
                               "does not generate text; generation needs a decoder run")
        return Generator(self.spec.model, self.params, self.mesh, self.rules, abstract=abstract_fn(self.spec))

    def explain(self) -> Table:
        """Where every parameter of the run lives on its mesh (see :func:`slimjax.sharding.explain`)."""
        built = self.rundir.built
        return sharding.explain(built.axes, built.shapes, self.rules, self.mesh)


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None, tokenizer: str | None = None
             ) -> LoadedRun:
    """The latest (or given) checkpoint of a run directory, with its tokenizer.

    ``mesh``: restore onto this mesh instead of the one in the run's config (any device count the
    rules can split the parameters over). ``tokenizer``: a tokenizer file to use instead of the
    run's own. Raises ``SlimjaxError`` naming what is missing.
    """
    rd = open_run(workdir, step)
    if mesh is not None:
        rd.mesh = mesh
    data = rd.cfg.data if tokenizer is None else dataclasses.replace(rd.cfg.data, tokenizer=tokenizer)
    tok = run_tokenizer(data, rd.workdir, rd.cfg.model.vocab_size, "load_run")
    return LoadedRun(rd, tok)


def generate(run: LoadedRun, prompts: str | Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0) -> list[str]:
    """Continuations of text prompts (each encoded after BOS; generation stops at EOS), greedy by
    default; the same sampling options as ``slimjax generate``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    return complete(run.generator, run.tokenizer, prompts, max_new_tokens, sampling, seed)


def _batch_rows(run: LoadedRun, batch_size: int) -> int:
    """Rows per forward pass: ``batch_size`` or the run's global batch, split evenly over the devices."""
    rows = batch_size or run.config.train.global_batch_size
    ways = int(np.prod([run.mesh.shape[a] for a in BATCH_AXES]))
    if rows % (ways * jax.process_count()):
        raise SlimjaxError(f"batch_size={rows} must be a multiple of the {ways} batch-sharding devices "
                           f"x {jax.process_count()} processes")
    return rows


def _with_sources(data: DataConfig, sources: Sequence[str | dict | SourceConfig]) -> DataConfig:
    """The run's data config reading ``sources`` (``data.sources`` specs) instead of its own, if any."""
    if not sources:
        return data
    return dataclasses.replace(data, sources=tuple(
        s if isinstance(s, SourceConfig) else parse_source(f"sources[{i}]", s) for i, s in enumerate(sources)))


def evaluate(run: LoadedRun, sources: Sequence[str | dict | SourceConfig] = (), split: str = "eval", max_docs: int = 0,
             batch_size: int = 0) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of the run on the ``split`` ("eval": held out, or
    "train") documents of ``sources`` (``data.sources`` specs; default: the run's own), as
    ``slimjax eval`` computes them; ``batch_size`` 0 takes the run's ``train.global_batch_size``.
    An encoder run gives its MLM and pair-task loss and accuracy (``mlm``, ``mlm_accuracy``,
    ``nsp``, ``nsp_accuracy``) and the unigram baseline ``unigram_accuracy`` instead."""
    data = _with_sources(run.config.data, sources)
    if split not in ("eval", "train"):
        raise SlimjaxError(f"split={split!r}: choose 'eval' (held out) or 'train'")
    rows = _batch_rows(run, batch_size)
    docs = evaluation.split_documents(data, split, max_docs)
    if not docs:
        raise SlimjaxError(f"no documents in the '{split}' split of {', '.join(s.name for s in data.sources)}; "
                           "try split='train' or other sources")
    rd = run.rundir
    family = rd.spec.family
    step_fn = evaluation.compile_eval_step(rd.built.graphdef, rd.built.shapes, rd.shardings(), rd.mesh, rd.rules,
                                           rows, data.seq_len, family)
    head = {"step": run.step, "split": split, "sources": [s.name for s in data.sources],
            "tokenizer": run.tokenizer.path, "seq_len": data.seq_len}
    if family == "encoder":
        cfg = run.config
        return head | evaluation.score_masked(step_fn, run.params, data, cfg.pretrain, run.tokenizer, docs, rows,
                                              cfg.train.seed, cfg.model.vocab_size, rd.mesh, rd.rules)
    score = evaluation.score_documents(step_fn, run.params, data, run.tokenizer, docs, rows, rd.mesh, rd.rules)
    return head | score.as_dict()


def explain(config: ml_collections.ConfigDict | Config, devices: Sequence[jax.Device] | None = None) -> Table:
    """Where every parameter of ``config``'s model would live on its mesh, before anything is
    compiled or allocated: the model is built abstractly (shapes only) from the config's spec,
    transforms included, and its rules applied to the mesh over ``devices`` (default: all)."""
    cfg = config if isinstance(config, Config) else validate(config)
    built = build(spec_from_config(cfg))
    return sharding.explain(built.axes, built.shapes, Rules.from_config(cfg.mesh), sharding.make_mesh(cfg.mesh, devices))


def run_command(command: str, *flags: str) -> None:
    """Runs a ``slimjax`` command in this process, as the shell would (``run_command("prepare",
    "--source=stdlib", "--out=data")``), for notebooks; a failing command raises ``SlimjaxError``
    with its one-line message instead of exiting."""
    from slimjax.cli import dispatch  # the command table imports every command: only when asked

    status = dispatch(command, flags)
    if status != 0:
        raise SlimjaxError(f"slimjax {command} exited with status {status}")


def evaluate_classifier(run: LoadedRun, split: str = "eval", batch_size: int = 0, max_examples: int = 0,
                        sources: Sequence[str | dict | SourceConfig] = ()) -> dict[str, Any]:
    """Accuracy and macro-F1 of a classification run (``slim.classify``) on the ``split`` examples
    of its labelled sources (or of ``sources``, labelled ones, e.g. for an imported classifier),
    every one or the first ``max_examples`` of the fixed shuffle that training's evaluation uses,
    beside the majority-class baseline (the training set's most frequent class); ``batch_size``
    0 takes the run's ``train.global_batch_size``."""
    from slimjax.data import finetune, records

    head = classify.head_of(run.rundir.built)
    if head is None:
        raise SlimjaxError(f"{run.workdir} is not a classification run (its slim recipe has no 'classify')")
    cfg, rd = run.config, run.rundir
    data = _with_sources(cfg.data, sources)
    rows = _batch_rows(run, batch_size)
    classes = cfg.slim.classify.classes

    def labelled(part: str) -> dict[str, np.ndarray]:
        return finetune.classification_examples(records.labelled(data, part, classes), classes, run.tokenizer,
                                                data.seq_len, sep=rd.spec.family == "encoder")

    examples = finetune.permuted(labelled(split))
    if max_examples:
        examples = {k: v[:max_examples] for k, v in examples.items()}
    train = labelled("train")
    counts = {c: int(np.sum(train["labels"] == i)) for i, c in enumerate(classes)}
    batch_sharding = {k: NamedSharding(rd.mesh, rd.rules.spec(axes)) for k, (axes, _) in pipeline.CLASSIFY_BATCH.items()}

    def step(params, batch):
        with activation_rules(rd.mesh, rd.rules):
            return classify.make_eval_step(rd.built.graphdef, head)(params, batch)

    step = jax.jit(step, in_shardings=(rd.shardings(), batch_sharding), out_shardings=NamedSharding(rd.mesh, PartitionSpec()))
    predicted, labels = [], []
    for batch in finetune.fixed_batches(examples, rows, 0, jax.process_index(), jax.process_count()):
        out = jax.device_get(step(run.params, pipeline.to_global(batch, batch_sharding)))
        keep = np.asarray(out["labels"]) >= 0
        predicted.append(np.asarray(out["predicted"])[keep])
        labels.append(np.asarray(out["labels"])[keep])
    true = np.concatenate(labels)
    base = evaluation.majority_baseline(counts, true, classes)
    return {"step": run.step, "split": split, "sources": [s.name for s in data.sources], "examples": len(true),
            **evaluation.classification_metrics(np.concatenate(predicted), true),
            "majority_class": base["class"], "majority_accuracy": base["accuracy"],
            "majority_macro_f1": base["macro_f1"]}
