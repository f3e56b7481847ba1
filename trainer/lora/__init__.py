"""LoRA adapters (peft) on the UNet and text encoders: adding, merging and removing them, and their weights.

Their file formats (diffusers', kohya's, LyCORIS') live in :mod:`trainer.interop`.
"""
