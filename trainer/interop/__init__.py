"""Every foreign weight format, in and out: SD single files (layouts, model-type detection, the key
maps of the UNet, VAE and text encoders, ldm's EMA copy, the prediction type), diffusers pipeline
folders, pickles read without running code, and LoRA/LyCORIS files (diffusers', kohya's, LyCORIS').

:mod:`trainer.interop.import_weights` is ``lf-import``'s work; :mod:`trainer.checkpoint.export`
writes single files and LoRA files through this package.
"""
