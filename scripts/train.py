"""Train through absl.app: the same flags as `slimjax train`, the same `slimjax.train` call (which
first joins a multi-process run when the `distributed.` config, SLURM or a Cloud TPU VM says so).

    python scripts/train.py --config=configs/tiny.py --config.train.steps=50 --workdir=/tmp/run
"""

import sys

from absl import app
from absl import flags as absl_flags

import slimjax
from slimjax.cli import train
from slimjax.cli.command import wants_help
from slimjax.errors import SlimjaxError, one_line


def parse_flags(argv):
    # slimjax parses the flags itself; absl only needs to know that parsing happened.
    absl_flags.FLAGS.mark_as_parsed()
    try:
        if wants_help(argv[1:]):
            print(train.COMMAND.help(argv[1:]))
            sys.exit(0)
        return train.parse(argv[1:])
    except SlimjaxError as e:
        print(f"train.py: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)


def main(parsed):
    config, workdir = parsed
    try:
        slimjax.train(config, workdir)
    except SlimjaxError as e:
        print(f"train.py: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
