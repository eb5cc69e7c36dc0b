"""`python -m nbgateway`: the same as the `nbgateway` command."""

import sys

from nbgateway.cli import main

sys.exit(main())
