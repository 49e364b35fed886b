"""PixelRefer-Lite (arXiv 2510.23603), the second region model: configuration, modeling, processing.

May import ``osprey.loading`` (checkpoint files, strict loading), ``osprey.model`` and ``osprey.runtime``;
nothing else of the project.
"""
