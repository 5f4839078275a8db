"""``python -m cp_token`` = ``cp-token``."""

import sys

from cp_token.cli import main

sys.exit(main())
