"""The retraining loop: the training store of predictions and accepted labels, the job queues and the
worker, webhook intake, head and LoRA training jobs, and the per-project model registry.

May import ``backend.labelstudio``, ``backend.acceptance``, ``backend.errors`` and ``osprey``.
"""
