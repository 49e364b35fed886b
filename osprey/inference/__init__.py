"""Labelling many regions of one image: fields, question plans, the fast shared-prefix path, the
upstream-style baseline, the feature cache and the public ``Osprey`` API.

May import ``osprey.model``; never ``osprey.learning``, ``osprey.sam`` or ``backend``.
"""
