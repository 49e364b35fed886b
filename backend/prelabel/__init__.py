"""Bulk pre-labelling: the engine (serial, pipelined, or on Ray Data across GPUs and machines) that
writes one prediction per task through Label Studio's API or to a file, the claims that keep one writer
per task and version, the jobs that finish what a batch ``/predict`` deferred or an import brought, and
encoding images ahead of time.

May import ``backend.predict``, ``backend.jobs``, ``backend.labelstudio``, ``backend.database`` (the
claims table), ``backend.errors`` and ``osprey``; never ``backend.runtime`` or ``backend.service``
(which build and run it).
"""
