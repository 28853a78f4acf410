"""``python -m flows.cli``: the ``embedstream`` command."""

import sys

from flows.cli import main

sys.exit(main())
