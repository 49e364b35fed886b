"""The Osprey network as the paper defines it: architecture config, vision tower, mask extractor, LLM
adapter, prompts, preprocessing and strict checkpoint loading.

May import torch, open_clip/timm (``vision``), transformers (``llm``) and ``osprey.loading`` (what every
model's loading shares) only.
"""
