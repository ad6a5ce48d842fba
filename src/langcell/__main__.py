"""``python -m langcell`` (and ``torchrun ... -m langcell``) runs the command-line interface."""

import sys

from .cli import main

sys.exit(main())
