"""The slimming report: what a run's weights cost (parameters, zeros, bytes), what they score, how
fast they run, and, against another run, which savings are real.

Every slimming method ends with the same questions, so one report answers them for any run:

- per matrix layer (``blocks/{i}/attn/wq`` per stacked layer, as ``slimjax.slim.select`` names
  them): shape, parameters, non-zeros, sparsity; totals over every parameter; bytes on disk of
  the checkpoint step and of a sparse copy at ``<workdir>/sparse`` (``sparse_store``);
- quality on held-out text with ``slimjax eval``'s code (loss, perplexity, bits per byte);
- speed on the current backend: the compiled eval step (forward + NLL) on one ``[rows, seq_len]``
  batch, and greedy decoding per token from the difference of an ``n``-token and a 1-token
  generation (so the prefill is not counted as decoding);
- against another run (evaluated on this run's documents): ratios and a verdict per saving
  (:func:`compare`).
  Zeros at unchanged shapes only shrink storage, since XLA multiplies them like any other
  number; fewer heads, neurons or layers shrink the math itself. Speed-ups are stated as measured.

Opening run directories belongs to the CLI layer: ``slimjax.cli.report.build_report(workdir,
against)`` opens the runs and calls :func:`run_report` and :func:`compare` here.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from slimjax.data.tokenizer import Tokenizer
from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense
from slimjax.slim.select import MATRIX_LAYERS, layer_names, stacked_layers
from slimjax.slim.sparse_store import store_bytes

SPARSE_DIR = "sparse"
REPORT_FILE = "report.json"
PLOT_FILE = "sparsity.png"
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size")
DECODE_TOKENS = 32
PROMPT_TOKENS = 8
SIZE_ONLY = "size-only: XLA runs the zeros as dense math"
REAL = "real: shapes shrank"


class Run(Protocol):
    """What the report reads of an opened run (``slimjax.cli.rundir.RunDir`` is one)."""

    workdir: str
    step: int
    cfg: Any
    spec: Any
    mesh: Any
    rules: Any
    checkpointer: Any
    built: Any

    def shardings(self) -> dict: ...

    def restore_params(self) -> dict: ...


def _name_key(name: str) -> list[tuple[int, Any]]:
    """Sorts ``blocks/10/...`` after ``blocks/9/...``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split("/")]


def _matrix_weights(rd: Run) -> tuple[dict[str, int], dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """``{weight leaf path: stacked layers (0: one layer)}`` for every matrix layer of the run's
    model, and for quantized ones (``slim.quant``: codes instead of a kernel) ``{codes path:
    (one layer's kernel shape, per-layer bits)}``."""
    from slimjax.slim.quant import TAP_NAME, QuantTap

    model = nnx.merge(rd.built.graphdef, rd.built.shapes)
    out, codes = {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and isinstance(node.tap, QuantTap) and node.kernel is None:
            tap = node.tap
            lead = len(tap.kernel_shape) - tap.n_in - tap.n_out
            leaf = "/".join(map(str, (*path, TAP_NAME, "codes")))
            out[leaf] = tap.kernel_shape[0] if lead else 0
            codes[leaf] = (tap.kernel_shape[lead:], tap.bits)
        elif isinstance(node, Dense) and node.kernel is None:
            continue  # factored (slim.lowrank): its u and v count in the totals, not as a matrix row
        elif isinstance(node, MATRIX_LAYERS):
            leaf = "kernel" if isinstance(node, Dense) else "embedding"
            out["/".join(map(str, (*path, leaf)))] = stacked_layers(node)
    return out, codes


def weight_stats(rd: Run, params: dict) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(per-layer rows, totals) of a run's parameters. Non-zeros are counted on the devices (per
    stacked layer for matrix weights) and only the counts come back, so this works for any mesh."""
    from slimjax.sharding import tree_paths
    from slimjax.slim.quant import TAP_NAME, QuantTap

    stacked, codes = _matrix_weights(rd)
    paths = tree_paths(params)

    def counts(tree):
        leaves = jax.tree.leaves(tree)
        if codes:  # quantized layers count the zeros of the kernels their codes stand for
            kernels = {"/".join(map(str, (*path, TAP_NAME, "codes"))): node.tap.dequantized()
                       for path, node in nnx.iter_graph(nnx.merge(rd.built.graphdef, tree))
                       if isinstance(node, Dense) and isinstance(node.tap, QuantTap)}
            leaves = [kernels.get(p, x) for p, x in zip(paths, leaves)]
        return [jnp.count_nonzero(x, axis=tuple(range(1, x.ndim)) if stacked.get(p) else None)
                for p, x in zip(paths, leaves)]

    nonzeros = jax.jit(counts, out_shardings=NamedSharding(rd.mesh, PartitionSpec()))(params)
    nonzeros = [np.asarray(jax.device_get(n)) for n in nonzeros]
    leaves = dict(zip(paths, jax.tree.leaves(params)))
    layers = []
    for (path, nz) in zip(paths, nonzeros):
        if path not in stacked:
            continue
        n = stacked[path]
        shape = codes[path][0] if path in codes else leaves[path].shape[1:] if n else leaves[path].shape
        size = int(np.prod(shape))
        module = tuple(path.split("/")[:-2 if path in codes else -1])  # .../wq/tap/codes: .../wq
        for i, name in enumerate(layer_names(module, n)):
            count = int(nz[i] if n else nz)
            row = {"name": name, "shape": list(shape), "params": size, "nonzeros": count,
                   "sparsity": 1.0 - count / size if size else 0.0}
            if path in codes:
                row["bits"] = codes[path][1][i]
            layers.append(row)
    layers.sort(key=lambda r: _name_key(r["name"]))
    # Parameters counted as weights: a quantized layer's packed codes stand for its whole kernel.
    total = sum(max(stacked[p], 1) * int(np.prod(codes[p][0])) if p in codes else int(np.prod(x.shape))
                for p, x in leaves.items())
    nonzero = sum(int(n.sum()) for n in nonzeros)
    matrix = sum(r["params"] for r in layers)
    totals = {"params": total, "nonzero_params": nonzero, "sparsity": 1.0 - nonzero / total if total else 0.0,
              "matrix_params": matrix, "matrix_nonzeros": sum(r["nonzeros"] for r in layers),
              # Bytes of the parameters as held: float32 leaves 4 each, quantized codes 1 per stored byte.
              "weight_bytes": sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves.values())}
    return layers, totals


def disk_bytes(rd: Run) -> dict[str, Any]:
    """Bytes on disk of the checkpoint step (all of it, and its parameter items alone) and of
    the sparse copy at ``<workdir>/sparse`` when there is one (else None)."""
    from slimjax.checkpoint import PARAM_ITEMS

    step_dir = rd.checkpointer.step_dir(rd.step)
    sparse = os.path.join(rd.workdir, SPARSE_DIR)
    return {"checkpoint_bytes": store_bytes(step_dir),
            "checkpoint_param_bytes": sum(store_bytes(os.path.join(step_dir, item)) for item in PARAM_ITEMS),
            "sparse_bytes": store_bytes(sparse) if os.path.isdir(sparse) else None,
            "sparse_dir": sparse if os.path.isdir(sparse) else None}


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` (which must block until its result is ready), after one warm-up call."""
    fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _batch_ways(rd: Run) -> int:
    from slimjax.sharding import BATCH_AXES

    ways = 1
    for axis in BATCH_AXES:
        ways *= rd.mesh.shape[axis]
    return ways * jax.process_count()


def measure(rd: Run, params: dict, tok: Tokenizer, docs: Sequence[str], rows: int, timing_repeats: int
            ) -> tuple[dict, dict, Callable[[], Any]]:
    """(quality, speed, forward) of a run on ``docs``, scored with ``tok`` (the run's tokenizer) and
    its packing; ``forward()`` runs the timed forward pass once more (for interleaved timing)."""
    from slimjax.data import pipeline
    from slimjax.infer import evaluate
    from slimjax.infer.generate import Generator
    from slimjax.slim.spec import abstract_fn

    data = rd.cfg.data
    if rows % _batch_ways(rd):
        raise SlimjaxError(f"--batch_size={rows} must be a multiple of the {_batch_ways(rd)} batch-sharding "
                           f"devices of run '{rd.workdir}'")
    step_fn = evaluate.compile_eval_step(rd.built.graphdef, rd.built.shapes, rd.shardings(), rd.mesh, rd.rules, rows,
                                         data.seq_len)
    score = evaluate.score_documents(step_fn, params, data, tok, docs, rows, rd.mesh, rd.rules)
    quality = score.as_dict()

    batch = pipeline.to_global(evaluate.document_batches(data, tok, docs[:1], rows)[0],
                               pipeline.batch_sharding(rd.mesh, rd.rules))
    forward = lambda: jax.block_until_ready(step_fn(params, batch))  # noqa: E731
    forward_ms = _median_ms(forward, timing_repeats)
    speed = {"backend": jax.default_backend(), "forward_rows": rows, "seq_len": data.seq_len,
             "forward_ms": forward_ms, "forward_tokens_per_s": rows * data.seq_len / (forward_ms / 1e3)}

    generator = Generator(rd.spec.model, params, rd.mesh, rd.rules, abstract=abstract_fn(rd.spec))
    prompt = [tok.bos_id, *tok.encode_batch([docs[0]])[0]][:PROMPT_TOKENS]
    new = min(DECODE_TOKENS, rd.spec.model.max_seq_len - len(prompt))
    prompts = [prompt] * generator.batch_ways
    if new >= 2:  # decoding per token: the n-token time less the 1-token time (prefill + first token)
        one = _median_ms(lambda: generator.generate(prompts, 1), timing_repeats)
        full = _median_ms(lambda: generator.generate(prompts, new), timing_repeats)
        speed.update(decode_rows=len(prompts), decode_tokens=new, prefill_ms=one, generate_ms=full,
                     decode_ms_per_token=max(full - one, 0.0) / (new - 1))
    return quality, speed, forward


def interleaved_ms(forwards: Sequence[Callable[[], Any]], rounds: int, calls: int = 3) -> list[float]:
    """Median forward time of each callable, timed in alternation (A B A B ...) for ``rounds``
    rounds of ``calls`` calls, so a load that comes and goes on the machine hits both alike."""
    times: list[list[float]] = [[] for _ in forwards]
    for _ in range(max(rounds, 1)):
        for i, fn in enumerate(forwards):
            times[i].append(_median_ms(fn, calls))
    return [statistics.median(t) for t in times]


def run_report(rd: Run, tok: Tokenizer, docs: Sequence[str], rows: int, timing_repeats: int,
               timers: list | None = None) -> dict[str, Any]:
    """Everything the report says about one opened run whose tokenizer is ``tok``: quality on ``docs`` scored
    ``rows`` rows at a time, timings as medians of ``timing_repeats`` calls. The timed forward
    pass is appended to ``timers`` when given (to time two runs in alternation)."""
    params = rd.restore_params()
    layers, totals = weight_stats(rd, params)
    quality, speed, forward = measure(rd, params, tok, docs, rows, timing_repeats)
    if timers is not None:
        timers.append(forward)
    return {"workdir": rd.workdir, "step": rd.step,
            "model": {k: getattr(rd.spec.model, k) for k in SHAPE_KEYS},
            "recipe": [name for name, _ in rd.spec.recipe], "layers": layers, "totals": totals,
            "disk": disk_bytes(rd), "quality": quality, "speed": speed}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(run: dict[str, Any], other: dict[str, Any]) -> tuple[dict[str, float | None], list[dict[str, str]]]:
    """(ratios run / other, verdicts) of two runs' reports: one verdict per kind of saving."""
    t, o = run["totals"], other["totals"]
    d, od = run["disk"], other["disk"]
    # The smaller on-disk copy of each run's parameters (Orbax compresses, so a sparse copy need not be smaller).
    smallest = min(b for b in (d["sparse_bytes"], d["checkpoint_param_bytes"]) if b is not None)
    other_smallest = min(b for b in (od["sparse_bytes"], od["checkpoint_param_bytes"]) if b is not None)
    s, os_ = run["speed"], other["speed"]
    ratios = {
        "params": _ratio(t["params"], o["params"]),
        "nonzero_params": _ratio(t["nonzero_params"], o["nonzero_params"]),
        "weight_bytes": _ratio(t["weight_bytes"], o["weight_bytes"]),
        "checkpoint_bytes": _ratio(d["checkpoint_bytes"], od["checkpoint_bytes"]),
        "checkpoint_param_bytes": _ratio(d["checkpoint_param_bytes"], od["checkpoint_param_bytes"]),
        "smallest_copy_bytes": _ratio(smallest, other_smallest),
        "perplexity_delta_pct": 100.0 * (run["quality"]["perplexity"] / other["quality"]["perplexity"] - 1.0),
        "bits_per_byte_delta_pct": 100.0 * (run["quality"]["bits_per_byte"] / other["quality"]["bits_per_byte"] - 1),
        "forward_speedup": _ratio(os_["forward_ms"], s["forward_ms"]),
        "decode_speedup": _ratio(os_.get("decode_ms_per_token"), s.get("decode_ms_per_token")),
    }
    verdicts = []

    changed = [f"model.{k} {other['model'][k]} -> {run['model'][k]}" for k in SHAPE_KEYS
               if run["model"][k] != other["model"][k]]
    mine = {r["name"]: r for r in run["layers"]}
    theirs = {r["name"]: r for r in other["layers"]}
    reshaped = [n for n in mine.keys() & theirs.keys() if mine[n]["shape"] != theirs[n]["shape"]]
    gone = len(theirs.keys() - mine.keys())
    if changed or reshaped or gone or mine.keys() != theirs.keys():
        detail = changed + ([f"{len(reshaped)} layers changed shape"] if reshaped else []) + (
            # A factored layer (slim.lowrank) has no matrix row of its own: it counts here too.
            [f"{gone} layer matrices removed or factored"] if gone else []) + [f"parameters {ratios['params']:.3g}x"]
        shrank = t["params"] < o["params"]
        verdicts.append({"saving": "structure", "kind": "real" if shrank else "none", "detail": "; ".join(detail),
                         "verdict": REAL if shrank else "shapes changed without fewer parameters"})
    same = [n for n in mine.keys() & theirs.keys() if mine[n]["shape"] == theirs[n]["shape"]]
    # Zeros that rounding made in quantized layers are the quantization's, reported below.
    sparser = [n for n in same if mine[n]["nonzeros"] < theirs[n]["nonzeros"] and not mine[n].get("bits")]
    if sparser:
        size = sum(mine[n]["params"] for n in sparser)
        zeros = 1 - sum(mine[n]["nonzeros"] for n in sparser) / size
        was = 1 - sum(theirs[n]["nonzeros"] for n in sparser) / size
        detail = f"{len(sparser)} layers at unchanged shapes hold {zeros:.1%} zeros (was {was:.1%})"
        if d["sparse_bytes"]:
            detail += f"; sparse copy {d['sparse_bytes']:,} bytes vs checkpoint params {d['checkpoint_param_bytes']:,}"
        verdicts.append({"saving": "unstructured sparsity", "kind": "size-only", "detail": detail,
                         "verdict": SIZE_ONLY})
    quantized = [r for r in mine.values() if r.get("bits")]
    if quantized:
        widths = ", ".join(f"{b}-bit x{sum(r['bits'] == b for r in quantized)}"
                           for b in sorted({r["bits"] for r in quantized}))
        detail = (f"{len(quantized)} layers stored as integer codes ({widths}); parameter bytes "
                  f"{ratios['weight_bytes']:.3g}x, checkpoint parameter bytes {ratios['checkpoint_param_bytes']:.3g}x")
        verdicts.append({"saving": "quantization", "kind": "size-only", "detail": detail,
                         "verdict": "size-only: codes are dequantized to float before each matmul"})
    if not verdicts:
        verdicts.append({"saving": "none", "kind": "none", "detail": "same shapes, no extra zeros",
                         "verdict": "no saving in shapes or sparsity"})
    for what, key, speedup in (("forward", "forward_ms", "forward_speedup"),
                               ("decode", "decode_ms_per_token", "decode_speedup")):
        if ratios[speedup] is not None:
            verdicts.append({"saving": f"{what} latency", "kind": "measured",
                             "detail": f"{s[key]:.3g} ms vs {os_[key]:.3g} ms on {s['backend']}",
                             "verdict": f"measured {what} speed-up {ratios[speedup]:.2f}x"})
    return ratios, verdicts


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns, floats with 3 significant digits (as ``bench/table.py`` prints them)."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


SUMMARY = (("params", "totals"), ("nonzero_params", "totals"), ("sparsity", "totals"), ("weight_bytes", "totals"),
           ("checkpoint_bytes", "disk"), ("checkpoint_param_bytes", "disk"), ("sparse_bytes", "disk"),
           ("loss", "quality"), ("perplexity", "quality"), ("bits_per_byte", "quality"),
           ("forward_ms", "speed"), ("decode_ms_per_token", "speed"))


def format_table(report: dict[str, Any]) -> str:
    """The report as text: per-layer weights of the run, then a summary (and ratios and verdicts
    when it is against another run)."""
    run = report["run"]
    layers = [{**r, "shape": "x".join(map(str, r["shape"])), "sparsity": float(r["sparsity"])} for r in run["layers"]]
    parts = [f"run {run['workdir']} (step {run['step']})", table(layers, ("name", "shape", "params", "nonzeros",
                                                                           "sparsity"))]
    other = report.get("against")
    rows = []
    for key, section in SUMMARY:
        row = {"metric": key, "run": run[section].get(key)}
        if other:
            row["against"] = other[section].get(key)
        rows.append(row)
    parts += ["", table(rows, ("metric", "run", "against") if other else ("metric", "run"))]
    if other:
        parts += ["", f"against {other['workdir']} (step {other['step']})",
                  table([{"ratio": k, "value": v} for k, v in report["ratios"].items()], ("ratio", "value")), ""]
        parts += [f"{v['saving']}: {v['verdict']} ({v['detail']})" for v in report["verdicts"]]
    return "\n".join(parts)


def plot_sparsity(report: dict[str, Any], path: str) -> None:
    """A bar chart of per-layer sparsity (the other run's beside it when there is one), written atomically."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's display backend stays as it was

    series = [("run", report["run"])] + ([("against", report["against"])] if "against" in report else [])
    names = [r["name"] for r in report["run"]["layers"]]
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.22 * len(names)), 4.2), dpi=110)
    ax = fig.subplots()
    for k, (label, rep) in enumerate(series):
        by_name = {r["name"]: r["sparsity"] for r in rep["layers"]}
        ax.bar(np.arange(len(names)) + k * width, [by_name.get(n, 0.0) for n in names], width,
               label=f"{label}: {os.path.basename(rep['workdir'])}")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=90, fontsize=6)
    ax.set_ylabel("sparsity (fraction of exact zeros)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)

