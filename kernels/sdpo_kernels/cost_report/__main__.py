"""`python -m sdpo_kernels.cost_report`: the CLI (`cli.main`)."""

import sys

from .cli import main

sys.exit(main())
