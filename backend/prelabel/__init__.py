"""Tasks -> predictions: finding and labelling a task's regions (several tasks per forward pass), the bulk
pre-label engine that writes predictions through Label Studio's API, and the work /predict defers.

May import ``backend.labelstudio``, ``backend.learning``, ``backend.errors`` and ``osprey``; never
``backend.service`` (which runs the engine: batch ``/predict``, the deferred jobs, ``osprey-label prelabel``).
"""
