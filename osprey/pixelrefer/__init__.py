"""PixelRefer-Lite (arXiv 2510.23603), the second region model: configuration, modeling, processing.

May import ``osprey.model`` (checkpoint files, devices) and ``osprey.runtime``; nothing else of the project.
"""
