"""Per-step choice among the variants a latent shard stores for one sample (cached augmentation).

Precompute may store several versions of a sample's image side (flips, crops) and of its caption side
(caption variants, shuffled tags). The loader batches all of them as ``NAME_variants`` ``(B, V, ...)``; before
a training batch goes to the device, :func:`draw_variants` keeps one per sample and names it ``NAME``
``(B, ...)``. Every image-side key of a sample takes the same variant index (a flipped latent gets its
flipped loss mask and crop coordinates), and every caption-side key shares one, drawn independently.

The draw is seeded by the run's seed, the rank and the training batches this rank consumed, which the
data module saves in checkpoints: a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import torch

VARIANTS_SUFFIX = "_variants"
#: batch keys that follow the image variant (one index per sample for all of them)
IMAGE_VARIANT_KEYS = ("latents", "mask", "masked_latents", "loss_mask", "time_ids")
#: batch keys that follow the caption variant
CAPTION_VARIANT_KEYS = ("text", "pooled", "token_ids", "token_ids_2")


def variant_generator(seed: int, rank: int, batches_consumed: int) -> torch.Generator:
    """The CPU generator of one training batch's draw: a function of the run's seed, the rank and the
    stream position only (so resume is exact)."""
    mixed = (seed * 1_000_003 + rank * 7_919 + batches_consumed * 104_729) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


def draw_variants(batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Replace each group's ``NAME_variants`` ``(B, V, ...)`` by ``NAME`` ``(B, ...)``, one variant per sample.

    Args:
        batch: a collated batch; keys without variants pass through.
        generator: the draw's generator; ``None`` takes variant 0 of every sample (validation: the
            canonical, unaugmented version).

    Returns:
        The same dict, changed in place.

    Raises:
        ValueError: keys of one group hold different numbers of variants.
    """
    for group in (IMAGE_VARIANT_KEYS, CAPTION_VARIANT_KEYS):
        present = [name for name in group if name + VARIANTS_SUFFIX in batch]
        if not present:
            continue
        counts = {name: batch[name + VARIANTS_SUFFIX].shape[1] for name in present}
        if len(set(counts.values())) != 1:
            raise ValueError(f"variant counts differ within one group: {counts}")
        size, count = batch[present[0] + VARIANTS_SUFFIX].shape[:2]
        if generator is None:
            index = torch.zeros(size, dtype=torch.long)
        else:
            index = torch.randint(count, (size,), generator=generator)
        rows = torch.arange(size)
        for name in present:
            batch[name] = batch.pop(name + VARIANTS_SUFFIX)[rows, index]
    return batch
