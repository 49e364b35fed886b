"""One task's regions (click, existing, segment everything) -> answers (the region model and the
project's head) -> Label Studio results; several tasks at once, and a batch within its budget.

May import ``backend.labelstudio``, ``backend.errors`` and ``osprey``.
"""
