"""Loading any region model: device and dtype, checkpoint files and where they are found (a local folder
or the Hugging Face cache), strict loading of a released layout, and a preset-or-checkpoint loader.

May import nothing of the project (torch, safetensors, huggingface_hub, accelerate); each model's own
key map, config translation and tokenizer stay with the model (``osprey.model``, ``osprey.pixelrefer``).
"""
