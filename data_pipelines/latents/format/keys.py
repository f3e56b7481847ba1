"""The latent-shard format's names: member keys, file names, the storage dtype, the format version."""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "latentforge.latent-shards"
FORMAT_VERSION = 1
LATENT_KEY = "latent.npy"
TEXT_KEY = "text.npy"
CAPTION_KEY = "txt"
META_KEY = "json"
MASK_KEY = "mask.npy"
MASKED_LATENT_KEY = "masked_latent.npy"
POOLED_KEY = "pooled.npy"
LATENT_VARIANTS_KEY = "latent_variants.npy"  # (V, C, h, w): the image variants besides latent.npy
LOSS_MASK_KEY = "loss_mask.npy"  # masked loss: (1, h, w) in [0, 1]; not the inpainting MASK_KEY
LOSS_MASK_VARIANTS_KEY = "loss_mask_variants.npy"  # (V, 1, h, w): the loss mask of each latent variant
MASKS_SETTING = "inpainting_masks"  # in the manifest's transforms: the shards hold the two members above
VARIANTS_SETTING = "image_variants"  # in the manifest's transforms: flip, crops_per_image, seed
VARIANTS_META = "variants"  # in KEY.json: [{"crop_top_left": [t, l], "flip": bool}, ...], one per stored variant
STORAGE_DTYPE = np.float16
MANIFEST_NAME = "manifest.json"
ENTRY_SUFFIX = ".entry.json"  # next to each complete shard: its record (shard-000003.entry.json)
UNCOND_NAME = "uncond.text.npy"
UNCOND_POOLED_NAME = "uncond.pooled.npy"
TEXT_VARIANTS_KEY = "text_variants.npy"  # (K, T, D): the caption variants' embeddings (captions.variants > 1)
POOLED_VARIANTS_KEY = "pooled_variants.npy"  # (K, P): their pooled embeddings, SDXL shards only
CAPTIONS_SETTING = "captions"  # in the manifest's transforms: the caption settings (variants and tag tricks)
CAPTION_VARIANTS_META = "caption_variants"  # in KEY.json: the K caption strings embedded
TOKEN_IDS_KEY = "token_ids.npy"  # (n, L) int32: the encoded caption's token ids (keep_token_ids=true)
TOKEN_IDS_2_KEY = "token_ids_2.npy"  # (n, L) int32: SDXL's second tokenizer's ids of the same caption
TOKEN_IDS_VARIANTS_KEY = "token_ids_variants.npy"  # (K, n, L) int32: the caption variants' ids, as text_variants
TOKEN_IDS_2_VARIANTS_KEY = "token_ids_2_variants.npy"  # (K, n, L) int32: SDXL's second tokenizer's
TOKEN_IDS_DTYPE = np.int32
TOKEN_IDS_SETTING = "token_ids"  # in the manifest's transforms (and so the cache key): the shards hold token ids
UNCOND_TOKEN_IDS_NAME = "uncond.token_ids.npy"  # (n, L) int32: the empty caption's ids
UNCOND_TOKEN_IDS_2_NAME = "uncond.token_ids_2.npy"  # (n, L) int32: SDXL's second tokenizer's
MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")  # SDXL's time_ids, in this order
