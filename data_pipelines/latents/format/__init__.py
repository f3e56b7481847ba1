"""The latent-shard format: the one place that defines its keys, dtypes, shapes and manifest.

A latent shard is a WebDataset tar whose samples hold::

    KEY.latent.npy   float16 (C, h, w)  VAE posterior mode times the VAE's scaling factor; (h, w) is
                                        the resolution / f, or its bucket's size / f when bucketed
    KEY.text.npy     float16 (T, D)     text encoder last hidden state of the tokenized caption
    KEY.txt          UTF-8               the caption
    KEY.json         JSON                the raw sample's metadata plus preprocessing info

and, for training an inpainting UNet (precompute with ``inpainting=true``; the manifest's
``transforms`` then hold ``inpainting_masks``, the mask settings)::

    KEY.mask.npy           float16 (1, h, w)  the sample's random mask at latent resolution (1: paint)
    KEY.masked_latent.npy  float16 (C, h, w)  latents of the image with the masked part grey (0)

and, for masked loss, in samples whose raw sample had a loss mask (``KEY.mask.png``; the shard's entry counts
them in ``loss_masks``)::

    KEY.loss_mask.npy      float16 (1, h, w)  the loss mask at latent resolution, in [0, 1] (1: the loss counts),
                                              through the image's resize and crop, area-averaged; a sample
                                              without it is unmasked (the loader gives it ones)

and, for Stable Diffusion XL (precompute with a second text encoder; the manifest then names
``text_encoder_2`` and ``pooled_shape``)::

    KEY.text.npy     float16 (T, D1 + D2)  both encoders' penultimate hidden states, concatenated on
                                           channels (SDXL's convention: CLIP ViT-L then OpenCLIP bigG)
    KEY.pooled.npy   float16 (P,)          the second encoder's pooled, projected embedding

and, for cached image augmentation (precompute with ``flip=true`` or ``crops_per_image=N``; the manifest's
``transforms`` then hold ``image_variants``, the settings ``flip``, ``crops_per_image`` and ``seed``)::

    KEY.latent_variants.npy  float16 (V, C, h, w)  the latents of the sample's other variants, in the order
                                                   of :mod:`data_pipelines.transforms.augment`: the canonical
                                                   crop's mirror image, then each random crop and its mirror
                                                   (V = (1 + N) x (2 if flip else 1) - 1)

``KEY.latent.npy`` stays the canonical variant (variant 0), so a reader that wants no variants reads such
a shard as any other; ``KEY.json``'s ``variants`` lists ``{"crop_top_left": [top, left], "flip": bool}``
for each of the V, in the same order (SDXL's ``crop_top_left`` of a mirror image is measured in the
mirrored resized image, as diffusers' SDXL training does). The crops are drawn per sample key with the
seed, so a rerun writes the same shards.
and, with caption variants (precompute's ``captions.variants`` K > 1; the manifest's ``transforms`` then
hold ``captions``, the caption settings, and ``KEY.json`` the K strings under ``caption_variants``)::

    KEY.text_variants.npy    float16 (K, T, D)  the K captions' embeddings; variant 0 is KEY.text.npy's
    KEY.pooled_variants.npy  float16 (K, P)     their pooled embeddings (SDXL shards)

and, with token ids (precompute's ``keep_token_ids=true``; the manifest's ``transforms`` then hold ``token_ids``,
and it records ``token_ids_shape`` ``[n, L]`` and ``uncond_token_ids_file``), for training the text encoder::

    KEY.token_ids.npy            int32 (n, L)     the ids of exactly the caption ``KEY.text.npy`` encodes (after
                                                  the caption tricks and prefix), as
                                                  :func:`data_pipelines.latents.text_encoding.chunked_token_ids`
                                                  gives them: ``n = max_token_length / 75`` chunks of the
                                                  tokenizer's ``L = model_max_length`` (77)
    KEY.token_ids_2.npy          int32 (n, L)     SDXL shards: the second tokenizer's ids of the same caption
    KEY.token_ids_variants.npy   int32 (K, n, L)  with caption variants: each variant's ids, in the order of
                                                  ``KEY.text_variants.npy`` (variant 0 is ``KEY.token_ids.npy``)
    KEY.token_ids_2_variants.npy int32 (K, n, L)  ... and SDXL's second tokenizer's

SDXL's micro-conditioning (``add_time_ids``) comes from ``KEY.json``, which every sample's
preprocessing fills: ``original_size`` ``[H, W]`` of the raw image, ``crop_top_left`` ``[top, left]``
of the crop in the resized image and ``target_size`` ``[h, w]`` of the encoded image (its bucket's
size, or the square resolution); :func:`micro_conditioning` reads them as SDXL's six ``time_ids``.
Integers in JSON, not float16 arrays: sizes above 2048 would round in float16.

The folder may be an object-store URL (``s3://bucket/latents``; :mod:`lf_common.object_store`): each
shard object is uploaded whole before its record, and the manifest is written last.

Next to the shards, ``manifest.json`` records the format version, the encoders (path, class,
fingerprint), the resolution and transforms, the shapes, every shard with its sample count and
the raw shard it came from (with that shard's SHA-256), and ``uncond.text.npy``: the empty
caption's embedding ``(T, D)``, used for caption dropout and classifier-free guidance. For SDXL the
unconditional embeddings are zeros, ``uncond.text.npy`` and ``uncond.pooled.npy`` ``(P,)``: SDXL's
training drops a caption by zeroing both encoders' outputs and the pooled embedding, and its
pipelines use zeros for an empty negative prompt (``force_zeros_for_empty_prompt``). Shards with token
ids also hold the empty caption's ids, ``uncond.token_ids.npy`` int32 ``(n, L)`` (SDXL: and
``uncond.token_ids_2.npy``). With aspect-ratio buckets (:mod:`data_pipelines.transforms.buckets`) the
manifest also lists the bucket sizes ``[height, width]`` and their latent shapes, and ``KEY.json`` holds
each sample's ``bucket`` index and ``target_size``.
The writer (precompute) and the reader (training loader) both import this package: :mod:`.keys` (member
and file names, dtype, version), :mod:`.samples` (one sample's members, written and checked when read),
:mod:`.manifest` (the manifest, shard entries and cache keys, the unconditional embeddings).
"""

from data_pipelines.latents.format.keys import (
    CAPTION_KEY,
    CAPTION_VARIANTS_META,
    CAPTIONS_SETTING,
    ENTRY_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENT_KEY,
    LATENT_VARIANTS_KEY,
    LOSS_MASK_KEY,
    LOSS_MASK_VARIANTS_KEY,
    MANIFEST_NAME,
    MASK_KEY,
    MASKED_LATENT_KEY,
    MASKS_SETTING,
    META_KEY,
    MICRO_CONDITIONING,
    POOLED_KEY,
    POOLED_VARIANTS_KEY,
    STORAGE_DTYPE,
    TEXT_KEY,
    TEXT_VARIANTS_KEY,
    TOKEN_IDS_2_KEY,
    TOKEN_IDS_2_VARIANTS_KEY,
    TOKEN_IDS_DTYPE,
    TOKEN_IDS_KEY,
    TOKEN_IDS_SETTING,
    TOKEN_IDS_VARIANTS_KEY,
    UNCOND_NAME,
    UNCOND_POOLED_NAME,
    UNCOND_TOKEN_IDS_2_NAME,
    UNCOND_TOKEN_IDS_NAME,
    VARIANTS_META,
    VARIANTS_SETTING,
)
from data_pipelines.latents.format.manifest import (
    CacheKey,
    EncoderInfo,
    LatentManifest,
    ShardEntry,
    entry_path,
    load_entry,
    load_uncond_embedding,
    load_uncond_pooled,
    load_uncond_token_ids,
    save_entry,
    save_uncond_embedding,
    save_uncond_pooled,
    save_uncond_token_ids,
)
from data_pipelines.latents.format.samples import (
    LatentSample,
    decode_latent_sample,
    encode_latent_sample,
    micro_conditioning,
)

__all__ = [
    "CAPTIONS_SETTING",
    "CAPTION_KEY",
    "CAPTION_VARIANTS_META",
    "ENTRY_SUFFIX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LATENT_KEY",
    "LATENT_VARIANTS_KEY",
    "LOSS_MASK_KEY",
    "LOSS_MASK_VARIANTS_KEY",
    "MANIFEST_NAME",
    "MASKED_LATENT_KEY",
    "MASKS_SETTING",
    "MASK_KEY",
    "META_KEY",
    "MICRO_CONDITIONING",
    "POOLED_KEY",
    "POOLED_VARIANTS_KEY",
    "STORAGE_DTYPE",
    "TEXT_KEY",
    "TEXT_VARIANTS_KEY",
    "TOKEN_IDS_2_KEY",
    "TOKEN_IDS_2_VARIANTS_KEY",
    "TOKEN_IDS_DTYPE",
    "TOKEN_IDS_KEY",
    "TOKEN_IDS_SETTING",
    "TOKEN_IDS_VARIANTS_KEY",
    "UNCOND_NAME",
    "UNCOND_POOLED_NAME",
    "UNCOND_TOKEN_IDS_2_NAME",
    "UNCOND_TOKEN_IDS_NAME",
    "VARIANTS_META",
    "VARIANTS_SETTING",
    "CacheKey",
    "EncoderInfo",
    "LatentManifest",
    "LatentSample",
    "ShardEntry",
    "decode_latent_sample",
    "encode_latent_sample",
    "entry_path",
    "load_entry",
    "load_uncond_embedding",
    "load_uncond_pooled",
    "load_uncond_token_ids",
    "micro_conditioning",
    "save_entry",
    "save_uncond_embedding",
    "save_uncond_pooled",
    "save_uncond_token_ids",
]
