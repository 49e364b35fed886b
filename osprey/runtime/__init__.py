"""What every model shares at run time: the per-image feature cache and its tiers, the step boundaries
where a scheduler may hand the model over, and byte accounting from shapes (``LiveBytes``).

May import torch and numpy only; never another ``osprey`` package or ``backend``.
"""
