"""Label Studio ML backend service built on the ``osprey`` library."""
