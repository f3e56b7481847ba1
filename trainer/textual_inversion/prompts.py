"""The prompts a textual-inversion step encodes: a template with the tokens, or each sample's own caption."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def training_prompts(
    captions: Sequence[str], templates: Sequence[str] | None, tokens: Sequence[str], generator: torch.Generator | None
) -> list[str]:
    """One prompt per sample.

    Args:
        captions: the samples' captions from the latent shards (``B``).
        templates: ``"a photo of {}"``-style prompts; ``None``: the captions as they are.
        tokens: the new words, joined by spaces in place of ``{}`` (diffusers' script's ``placeholder_string``).
        generator: draws a template per sample (``None``: the global RNG, which checkpoints restore).
    """
    if not templates:
        return list(captions)
    words = " ".join(tokens)
    picks = torch.randint(len(templates), (len(captions),), generator=generator).tolist()
    return [templates[i].format(words) for i in picks]
