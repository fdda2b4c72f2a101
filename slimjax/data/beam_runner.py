"""Running a slimjax pipeline on Apache Beam: the ``--runner`` / ``--beam_options`` flags of
``slimjax prepare`` and ``slimjax tokenize``, checked into one-line errors before anything is
written, and a pipeline run whose failures arrive as one line too.

Apache Beam is imported lazily: slimjax imports and runs locally without it, and a Beam runner
without it is an error saying what to install.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shlex
from typing import Any, Callable

from slimjax.errors import SlimjaxError, one_line

# --runner values and the Beam runner each selects ("local" is slimjax's own, in this process).
BEAM_RUNNERS = {"direct": "DirectRunner", "prism": "PrismRunner", "dataflow": "DataflowRunner",
                "flink": "FlinkRunner", "spark": "SparkRunner"}
_GATHERED = "_beam_gathered.pickle"


def check_runner(runner: str) -> None:
    """``--runner`` names ``local`` or a Beam runner."""
    if runner != "local" and runner not in BEAM_RUNNERS:
        raise SlimjaxError(f"unknown --runner '{runner}'; use local or a Beam runner: {', '.join(BEAM_RUNNERS)}")


def beam():
    """The ``apache_beam`` module; a SlimjaxError saying what to install when it is missing."""
    logging.disable(logging.WARNING)  # Beam warns at import about cloud clients a local run never uses
    try:
        import apache_beam
    except ImportError as e:
        raise SlimjaxError(f"--runner needs Apache Beam ({e}); pip install 'slimjax[beam]'") from None
    finally:
        logging.disable(logging.NOTSET)
    return apache_beam


def pipeline_options(runner: str, beam_options: str):
    """Beam ``PipelineOptions`` for ``--runner`` plus ``--beam_options`` passed through unchanged.

    Beam itself only warns about flags it does not know; here they are an error, as are values
    its parser or the runner's validation rejects.
    """
    check_runner(runner)
    beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        flags = shlex.split(beam_options)
    except ValueError as e:
        raise SlimjaxError(f"--beam_options '{beam_options}' does not parse: {e}") from None
    if any(f == "--runner" or f.startswith("--runner=") for f in flags):
        raise SlimjaxError("give the runner as --runner, not inside --beam_options")
    options = PipelineOptions([f"--runner={BEAM_RUNNERS[runner]}", *flags])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # argparse prints usage before exiting
            known = options.get_all_options()
            every = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        error = [line for line in stderr.getvalue().splitlines() if "error:" in line]
        raise SlimjaxError(f"Beam rejected --beam_options: {(error or ['bad value'])[-1].split('error:', 1)[1].strip()}"
                           ) from None
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise SlimjaxError(f"Beam does not know --beam_options {', '.join('--' + u for u in unknown)}; "
                           "see the runner's pipeline options")
    _validate(options, runner)
    return options


def _validate(options, runner: str) -> None:
    """The runner's own checks of the options (e.g. Dataflow's project, region, temp location)."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner

    logging.disable(logging.WARNING)  # the one-line error says it all; Beam would also log it
    try:
        instance = create_runner(BEAM_RUNNERS[runner])
        errors = PipelineOptionsValidator(options, instance).validate()
    except (ImportError, ValueError) as e:
        raise SlimjaxError(f"--runner={runner} is not usable here: {one_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)
    if errors:
        raise SlimjaxError(f"--runner={runner} rejected the options: {one_line('; '.join(errors))}")


def run(runner: str, options, build: Callable) -> None:
    """Builds (``build(pipeline)``) and runs a pipeline with ``options`` (from :func:`pipeline_options`)
    to completion. A SlimjaxError raised inside a stage arrives as itself; any other failure as a
    one-line SlimjaxError."""
    with _quiet(runner in ("direct", "prism")):
        try:
            with beam().Pipeline(options=options) as pipeline:
                build(pipeline)
        except SlimjaxError:
            raise
        except Exception as e:  # a stage's SlimjaxError arrives wrapped by the runner
            raise _user_error(e) or SlimjaxError(f"the Beam pipeline failed: {one_line(e)[:500]}") from e


def gather(pipeline, root: str, **parts) -> None:
    """Sends singleton PCollections (``AsSingleton``-able: a ``ToList``, a global combine) back to
    the driver: written together into a file in ``root`` (a directory every worker sees; the
    pipeline's output directory), which :func:`gathered` reads once the pipeline has finished.
    A pipeline's results cannot come back otherwise on a remote runner."""
    apache_beam = beam()
    from apache_beam.pvalue import AsSingleton

    (pipeline | "gather" >> apache_beam.Create([None])
     | "write gathered" >> apache_beam.Map(_write_gathered, root=root,
                                           **{k: AsSingleton(v) for k, v in parts.items()}))


def _write_gathered(_, root: str, **parts) -> None:
    with open(os.path.join(root, _GATHERED), "wb") as f:
        pickle.dump(parts, f)


def gathered(root: str) -> dict[str, Any]:
    """What :func:`gather` sent, by name; the file is removed (it is no part of the output)."""
    path = os.path.join(root, _GATHERED)
    with open(path, "rb") as f:
        parts = pickle.load(f)
    os.remove(path)
    return parts


@contextlib.contextmanager
def _quiet(local: bool):
    """On a local runner, Beam's own logging only repeats, with a traceback, the error the CLI
    prints in one line; remote runners keep their logs (job links, worker errors)."""
    logger = logging.getLogger("apache_beam")
    level = logger.level
    if local:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _user_error(e: BaseException) -> SlimjaxError | None:
    """The ``SlimjaxError`` behind a runner's wrapped exception, if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SlimjaxError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
