"""Every foreign weight format, in and out: SD single files (layouts, model-type detection, the key
maps of the UNet, VAE and text encoders, ldm's EMA copy, the prediction type), diffusers pipeline
folders, pickles read without running code, and LoRA/LyCORIS files (diffusers', kohya's, LyCORIS').

:mod:`trainer.interop.import_weights` is ``lf-import``'s work; :mod:`trainer.checkpoint.export`
writes single files and LoRA files through this package.

diffusers' ``loaders.single_file_utils`` reads the same files, but is not strict enough to replace the
reading here: its ldm converters pass over keys they have no rule for without a word, its
``infer_diffusers_model_type`` tells types apart by full-size shapes (an SD 2.x architecture at other
sizes is "v1") and takes configs from the hub, it keeps any dtype, and it has no diffusers -> ldm
direction for the export. Its converters and ``from_single_file`` are the oracles our key maps are
tested against (``tests/unit/test_sd_single_file.py``, ``test_sdxl_single_file.py``,
``test_single_file_import.py``); two tests fail if diffusers becomes strict (``test_sd_single_file.py``,
``test_model_types.py``).
"""
