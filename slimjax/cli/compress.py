"""``slimjax compress``: a recipe of slimming stages run one after another, and what it bought.

A recipe is a list of stages, each a slimjax command with its own flags, e.g.
``prune --method=wanda --sparsity=0.5; distill --steps=200; quantize --bits=4 --method=gptq``.
Stage k reads stage k-1's run (the first reads ``--workdir``) and writes its own run directory
``OUT/stages/k-NAME`` (a ``distill`` stage trains the previous stage's run as its student with
``--workdir`` as the teacher). Every stage is a run directory with checkpoints, so a recipe
killed anywhere resumes at the stage and step where it stopped when the command is re-run: a
finished prune or quantize stage is kept, a distillation resumes from its last checkpoint.

At the end every stage is reported against the original (``slimjax report``'s measurements:
parameters, weight bytes, bytes on disk, perplexity, bits per byte, forward and decode latency,
and which savings are real and which size-only), written to ``OUT/compress.json`` and printed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
from typing import Any, Callable, Sequence

from slimjax.cli.command import Command, Flag, integer
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

# "4x smaller at <= 5% perplexity": half the block weights removed (SparseGPT), recovered by
# distillation from the original, then 4-bit GPTQ codes in groups of 128 (>= 4x fewer weight bytes
# from the codes alone; the zeros are a size-only saving on top).
PRESETS = {
    "4x": "prune --method=sparsegpt --sparsity=0.5; distill --steps=200 --alpha=0.5 --temperature=2; "
          "quantize --bits=4 --group_size=128 --method=gptq",
}
STATE_FILE = "compress.json"
STAGES_DIR = "stages"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the recipe: the command, its flags, and where it writes."""

    index: int
    name: str
    flags: tuple[str, ...]
    directory: str

    def argv(self, previous: str, original: str) -> list[str]:
        """The command's flags with its input and output filled in."""
        if self.name == "distill":
            student = () if any(f.startswith("--layers") for f in self.flags) else (f"--student={previous}",)
            return [f"--teacher={original}", *student, f"--out={self.directory}", *self.flags]
        return [f"--workdir={previous}", f"--out={self.directory}", *self.flags]

    def done(self) -> bool:
        """A prune/quantize stage is done once its run is complete (``config.py`` is written last);
        a distillation is re-run, which resumes it or, when finished, changes nothing."""
        return self.name != "distill" and os.path.isfile(os.path.join(self.directory, "config.py"))


def commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from slimjax.cli import distill, lowrank, prune, quantize

    return {"prune": prune.run, "lowrank": lowrank.run, "distill": distill.run, "quantize": quantize.run}


def parsers() -> dict[str, Callable[[Sequence[str]], Any]]:
    from slimjax.cli import distill, lowrank, prune, quantize

    return {"prune": prune.parse, "lowrank": lowrank.parse, "distill": distill.parse, "quantize": quantize.parse}


COMMAND = Command("compress", "run a recipe of slimming stages and report each against the original", (
    Flag("workdir", "the run to compress (trained or imported)", metavar="RUN", required=True),
    Flag("out", "the recipe's directory: stages/K-NAME runs and compress.json (re-run to resume)", metavar="DIR",
         required=True),
    Flag("stages", "';'-separated stages, each a command and its flags: prune ...; distill ...; quantize ...",
         metavar="RECIPE"),
    Flag("preset", f"a recipe by name ({', '.join(f'{k}: {v}' for k, v in PRESETS.items())})", metavar="NAME"),
    Flag("report_docs", "held-out documents per stage report (0: all)", integer(0), 0, metavar="N"),
    Flag("repeats", "timed calls per stage report", integer(1), 3, metavar="N"),
), details="Stage k reads stage k-1's run (the first reads --workdir) and writes OUT/stages/k-NAME; a distill stage "
           "trains the previous run as its student with --workdir as the teacher. A re-run keeps finished stages "
           "and resumes a distillation from its last checkpoint.")


def parse(argv: Sequence[str]) -> dict:
    args = COMMAND.parse(argv)
    if bool(args.stages) == bool(args.preset):
        raise SlimjaxError("slimjax compress needs exactly one of --stages='CMD --flag=...; CMD ...' and --preset=NAME")
    if args.preset and args.preset not in PRESETS:
        raise SlimjaxError(f"--preset={args.preset!r} is not a preset{suggest(args.preset, PRESETS)}; presets: "
                           f"{', '.join(PRESETS)}")
    return vars(args)


def plan(text: str, out: str) -> list[Stage]:
    """The stages of a recipe, each checked (name, flags, order) before anything runs."""
    known = commands()
    stages = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        name, *flags = shlex.split(part)
        if name not in known:
            raise SlimjaxError(f"stage {i + 1} '{name}' is not a compress stage{suggest(name, known)}; stages: "
                               f"{', '.join(known)}")
        stages.append(Stage(i + 1, name, tuple(flags), os.path.join(out, STAGES_DIR, f"{i + 1}-{name}")))
    if not stages:
        raise SlimjaxError("--stages is empty; give stages such as 'prune --sparsity=0.5; quantize --bits=8'")
    seen: list[str] = []
    for s in stages:
        if s.name == "distill" and not seen and not any(f.startswith("--layers") for f in s.flags):
            raise SlimjaxError(f"stage {s.index} 'distill' has no student: put it after a stage that makes one "
                               "(prune, lowrank, quantize) or give it --layers=N")
        if s.name in ("distill", "prune", "lowrank") and "quantize" in seen:
            raise SlimjaxError(f"stage {s.index} '{s.name}' comes after 'quantize': stored integer codes are fixed; "
                               f"put {s.name} before quantize")
        seen.append(s.name)
    return stages


def run(argv: Sequence[str]) -> int:
    v = parse(argv)
    import jax

    from slimjax.cli.rundir import open_run

    original = open_run(v["workdir"]).workdir  # a clear error before anything is created
    out = os.path.abspath(os.path.expanduser(v["out"]))
    text = PRESETS[v["preset"]] if v["preset"] else v["stages"]
    stages = plan(text, out)
    # Every stage's flags checked up front by its own command's parser. Prune/quantize parsers also
    # refuse an existing --out, which a stage killed mid-write leaves behind (it is rewritten below),
    # so they check against a path that never exists.
    for i, s in enumerate(stages):
        if not s.done():
            previous = stages[i - 1].directory if i else original
            parsers()[s.name](s.argv(previous, original) if s.name == "distill" else
                              [f"--workdir={previous}", f"--out={os.path.join(out, '.check')}", *s.flags])
    log = lambda msg: print(f"slimjax compress: {msg}", flush=True) if jax.process_index() == 0 else None  # noqa: E731
    previous = original
    for s in stages:
        if s.done():
            log(f"stage {s.index} {s.name}: done earlier ({s.directory})")
        else:
            if s.name != "distill" and os.path.isdir(s.directory):
                shutil.rmtree(s.directory)  # a stage killed while writing its run: write it again
            log(f"stage {s.index} {s.name} {' '.join(s.flags)}")
            commands()[s.name](s.argv(previous, original))
        previous = s.directory
    result = compare_stages(original, stages, v["report_docs"], v["repeats"])
    if jax.process_index() == 0:
        from slimjax.train.metrics import write_json

        result["recipe"] = text
        write_json(os.path.join(out, STATE_FILE), result)
        print(format_stages(result))
        print(f"wrote {os.path.join(out, STATE_FILE)}")
    return 0


def compare_stages(original: str, stages: list[Stage], max_docs: int, repeats: int) -> dict[str, Any]:
    """Every stage's report against the original, on the original's held-out documents."""
    from slimjax.cli.report import build_report
    from slimjax.slim import report

    base = build_report(original, max_docs=max_docs, timing_repeats=repeats)["run"]
    rows = []
    for s in stages:
        run = build_report(s.directory, max_docs=max_docs, timing_repeats=repeats)["run"]
        ratios, verdicts = report.compare(run, base)
        rows.append({"stage": f"{s.index}-{s.name}", "flags": list(s.flags), "report": run, "ratios": ratios,
                     "verdicts": verdicts})
    return {"original": base, "stages": rows}


def format_stages(result: dict[str, Any]) -> str:
    """One line per stage against the original: size, quality and speed."""
    from slimjax.slim.report import table

    def row(name: str, run: dict, ratios: dict | None) -> dict:
        r = ratios or {}
        return {"stage": name, "params": run["totals"]["params"], "nonzero": run["totals"]["nonzero_params"],
                "weight_bytes": run["totals"]["weight_bytes"], "disk_param_bytes": run["disk"]["checkpoint_param_bytes"],
                "smaller_x": 1 / r["weight_bytes"] if r.get("weight_bytes") else 1.0,
                "perplexity": run["quality"]["perplexity"], "ppl_delta_%": r.get("perplexity_delta_pct", 0.0),
                "bits_per_byte": run["quality"]["bits_per_byte"], "forward_ms": run["speed"]["forward_ms"],
                "decode_ms_tok": run["speed"].get("decode_ms_per_token")}

    rows = [row("original", result["original"], None)]
    rows += [row(s["stage"], s["report"], s["ratios"]) for s in result["stages"]]
    lines = [table(rows, list(rows[0]))]
    for s in result["stages"]:
        lines.append(f"{s['stage']}: " + "; ".join(f"{v['saving']}: {v['verdict']}" for v in s["verdicts"]))
    return "\n".join(lines)
