"""alignkit's Hydra config tree, shipped as package data (``pkg://alignkit.conf``)."""
