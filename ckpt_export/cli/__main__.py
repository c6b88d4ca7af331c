"""`python -m ckpt_export.cli`: the `ckpt-export` command."""

import sys

from ckpt_export.cli import main

sys.exit(main())
