"""Caption variants: several captions per image, and kohya-style tag tricks, as pure functions of the text.

Precompute embeds ``K`` variants of each sample's caption once (``KEY.text_variants.npy``) and training draws
one per step (:mod:`data_pipelines.loading.variants`); an in-step path (DreamBooth, an online loader) can call
the same functions with its own generator. The tricks follow kohya-ss/sd-scripts (``library/train_util.py``,
``process_caption``):

- the caption splits into tags at ``separator`` (``,``), each stripped, empty ones dropped;
- the first ``keep_tokens`` tags stay in place; or, when the caption holds ``keep_tokens_separator``
  (e.g. ``|||``), the tags before it stay first and, after a second one, the tags after it stay last;
- the rest are shuffled (``shuffle_tags``), then each is dropped with probability ``tag_dropout``;
- the tags are joined again with ``separator`` and a space.

``prefix`` (a trigger word) goes first as a tag of its own and is never shuffled or dropped. Variant 0 is
the canonical caption, neither shuffled nor dropped (what ``KEY.text.npy`` holds and validation uses);
variant ``k`` starts from the sample's caption ``k mod N`` of its ``N`` captions. Every draw is seeded by
``seed``, the sample key and ``k``, so a rerun writes the same shards.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from lf_common.errors import ConfigError


@dataclass(frozen=True)
class CaptionSettings:
    """The ``captions:`` group of ``conf/precompute.yaml``.

    Attributes:
        variants: captions embedded per sample (``K``); 1 stores the one caption as before.
        shuffle_tags: shuffle the tags after the kept ones.
        keep_tokens: tags at the start that stay in place (not shuffled, not dropped).
        keep_tokens_separator: instead of ``keep_tokens``: the tags before it stay first (and after a
            second one, last); "" for none.
        tag_dropout: probability of leaving out each tag that is not kept.
        prefix: a trigger put first, as its own tag, in every variant ("" for none).
        separator: the tag separator.
        seed: the draws' seed (with the sample key and the variant index).
    """

    variants: int = 1
    shuffle_tags: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    tag_dropout: float = 0.0
    prefix: str = ""
    separator: str = ","
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variants < 1:
            raise ConfigError(f"captions.variants={self.variants}: expected at least 1")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ConfigError(f"captions.tag_dropout={self.tag_dropout}: expected a rate in [0, 1)")
        if self.keep_tokens < 0:
            raise ConfigError(f"captions.keep_tokens={self.keep_tokens}: expected 0 or more")
        if not self.separator.strip():
            raise ConfigError("captions.separator is empty: give the tag separator, e.g. ','")

    @property
    def active(self) -> bool:
        """Whether anything differs from one plain caption per sample (the shards' cache key then records it)."""
        return self != CaptionSettings(seed=self.seed)

    @property
    def tags(self) -> bool:
        """Whether captions are treated as tag lists (shuffled, dropped out or split at a separator)."""
        return self.shuffle_tags or self.tag_dropout > 0 or bool(self.keep_tokens_separator)

    def settings(self) -> dict[str, Any]:
        """The settings as recorded in the manifest's transforms (and so in the cache key)."""
        return asdict(self)


def split_tags(caption: str, settings: CaptionSettings) -> tuple[list[str], list[str], list[str]]:
    """``(fixed first, flexible, fixed last)`` tags of a caption (kohya's ``keep_tokens`` / separator rule)."""

    def tags_of(text: str) -> list[str]:
        return [t.strip() for t in text.split(settings.separator) if t.strip()]

    marker = settings.keep_tokens_separator
    if marker and marker in caption:
        first, rest = caption.split(marker, 1)
        last = ""
        if marker in rest:
            rest, last = rest.split(marker, 1)
        return tags_of(first), tags_of(rest), tags_of(last)
    tags = tags_of(caption)
    return tags[: settings.keep_tokens], tags[settings.keep_tokens :], []


def caption_variant(caption: str, settings: CaptionSettings, rng: random.Random | None) -> str:
    """One variant of ``caption``: its flexible tags shuffled and dropped out with ``rng`` (``None``: kept as
    they are, the canonical form), ``prefix`` first. A caption that is not a tag list only gets the prefix."""
    if settings.tags:
        first, flexible, last = split_tags(caption, settings)
        flexible = list(flexible)
        if rng is not None and settings.shuffle_tags:
            rng.shuffle(flexible)
        if rng is not None and settings.tag_dropout > 0:
            flexible = [t for t in flexible if rng.random() >= settings.tag_dropout]
        caption = f"{settings.separator.strip()} ".join(first + flexible + last)
    if settings.prefix:
        caption = f"{settings.prefix}{settings.separator.strip()} {caption}" if caption else settings.prefix
    return caption


def caption_variants(key: str, captions: list[str], settings: CaptionSettings) -> list[str]:
    """The ``settings.variants`` captions embedded for sample ``key``: variant 0 canonical, variant ``k``
    from caption ``k mod N``, shuffled and dropped out with a generator seeded by ``(seed, key, k)``."""
    variants = []
    for index in range(settings.variants):
        rng = random.Random(f"{settings.seed}:{key}:{index}") if index else None
        variants.append(caption_variant(captions[index % len(captions)], settings, rng))
    return variants


class StepCaptionTricks:
    """The tag tricks drawn afresh every step (training without a cache, ``data=images_online``): a
    ``(caption, rng) -> caption`` transform for the loader workers, with the keys of precompute's ``captions:``
    group (``variants`` and ``seed`` do not apply: every step is a new variant from the worker's generator).

    Args:
        **settings: :class:`CaptionSettings`' fields (``shuffle_tags``, ``keep_tokens``, ``keep_tokens_separator``,
            ``tag_dropout``, ``prefix``, ``separator``).
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = CaptionSettings(**settings)

    def __call__(self, caption: str, rng: Any) -> str:
        """``caption`` with its flexible tags shuffled and dropped out by a draw from ``rng`` (a NumPy
        ``Generator``), the prefix first."""
        return caption_variant(caption, self.settings, random.Random(int(rng.integers(2**63))))
