"""Per-project learning on accepted labels: region features, the fast head and its blending rule
(``blend``: the one rule serving and the promotion gate share, with weights fitted on held-out
labels), and LoRA fine-tuning of the served region model's LLM (Osprey's or PixelRefer-Lite's).

May import ``osprey.model``, ``osprey.inference`` and ``osprey.runtime``; never ``backend``.
"""
