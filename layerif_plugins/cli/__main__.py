"""``python -m layerif_plugins.cli`` (what ``torchrun -m`` launches)."""

import sys

from layerif_plugins.cli import main

sys.exit(main())
