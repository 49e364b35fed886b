"""The retraining loop: webhook intake, the training store of predictions and accepted labels, head and
LoRA training jobs, the held-out split, and the per-project model registry.

May import ``backend.labelstudio``, ``backend.acceptance``, ``backend.jobs``, ``backend.database``,
``backend.errors`` and ``osprey``; never ``backend.runtime`` or ``backend.service``.
"""
