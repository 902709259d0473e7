"""layerif_plugins."""
