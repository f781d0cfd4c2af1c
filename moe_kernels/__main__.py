"""``python -m moe_kernels`` is the ``moe-kernels`` command."""

import sys

from .cli import main

sys.exit(main())
