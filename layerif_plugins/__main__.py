import sys

from layerif_plugins.cli import console_main

sys.exit(console_main())
