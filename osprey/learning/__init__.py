"""Per-project learning on accepted labels: region features, the fast head and its blending rule, and
LoRA fine-tuning of Osprey's LLM.

May import ``osprey.model`` and ``osprey.inference``; never ``backend``.
"""
