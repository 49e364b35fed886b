"""Bulk pre-labelling: the engine that writes one prediction per task through Label Studio's API, the
jobs that finish what a batch ``/predict`` deferred, and encoding images ahead of time.

May import ``backend.predict``, ``backend.jobs``, ``backend.labelstudio``, ``backend.errors`` and
``osprey``; never ``backend.runtime`` or ``backend.service`` (which build and run it).
"""
