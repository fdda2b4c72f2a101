"""``python -m slimjax.cli ...`` is the ``slimjax`` command."""

import sys

from slimjax.cli import main

sys.exit(main())
