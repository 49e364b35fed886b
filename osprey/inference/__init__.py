"""Labelling many regions of one image: fields, question plans, the fast shared-prefix path, the
upstream-style baseline and the public ``Osprey`` API.

May import ``osprey.loading``, ``osprey.model``, ``osprey.pixelrefer`` and ``osprey.runtime``;
never ``osprey.learning``, ``osprey.sam`` or ``backend``.
"""
