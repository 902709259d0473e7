import sys

from layerif_plugins.cli import main

sys.exit(main())
