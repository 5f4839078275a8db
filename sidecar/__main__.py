"""``python -m sidecar`` = ``cp-token-sidecar``."""

import sys

from .cli import main

sys.exit(main())
