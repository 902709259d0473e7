"""``python -m layerif_plugins.cli`` (what ``torchrun -m`` launches)."""

import sys

from layerif_plugins.cli import console_main

sys.exit(console_main())
