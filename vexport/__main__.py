"""``python -m vexport``: the same as the ``vexport`` command."""

import sys

from vexport.cli import main

sys.exit(main())
