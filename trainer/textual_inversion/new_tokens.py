"""New tokens in a tokenizer and text encoder, their rows the only trainable weights.

Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion": a new word's embedding ``v*`` is optimised through the frozen text encoder and UNet.

diffusers' example (``examples/textual_inversion/textual_inversion.py``) trains the whole resized embedding
matrix and copies the original rows back after every optimizer step; that is exact for its plain AdamW in
float32, but not for an optimizer that keeps its own copy of the weights (DeepSpeed's float32 master
weights, schedule-free's ``z`` sequence), which would write its drifted rows back on the next step.
Here the text encoder's token embedding is replaced by :class:`NewTokenEmbedding`: the original table,
frozen, and a separate parameter ``(N, D)`` holding only the new rows. The optimizer never sees the other
rows, so none of them can change under any optimizer, weight decay, precision or strategy.

A token of ``num_vectors`` vectors is the tokenizer tokens ``T, T_1, ..., T_{N-1}`` (diffusers' naming,
:func:`~trainer.interop.embedding_files.vector_tokens`); prompts say ``T`` and are expanded
(:func:`~trainer.interop.embedding_files.expand_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CLIPTokenizer

from lf_common.errors import ConfigError
from trainer.interop.embedding_files import TextEncoder, vector_tokens


@dataclass(frozen=True)
class TextualInversionSettings:
    """What ``model.textual_inversion`` says.

    Attributes:
        tokens: the new words (``["<d7>"]``); a word the tokenizer already has is refused.
        num_vectors: vectors per token (kohya's ``num_vectors_per_token``, diffusers' ``num_vectors``).
        init_word: the rows start as this word's token embeddings (a word of several tokens fills the vectors in
            turn, as kohya does).
        templates: training prompts, ``{}`` standing for the tokens (``"a photo of {}"``); one is drawn per sample.
            ``None``: each sample's own caption from the latent shards, which should contain the tokens.
        embeddings_from: an embedding file (any layout :mod:`trainer.interop.embedding_files` reads) whose token
            continues training from its vectors (its token must be one of ``tokens``; ``num_vectors`` from the file).
        train_fraction: the rows train for this fraction of ``trainer.max_steps``, then stay (pivotal tuning: the
            UNet's LoRA adapters go on training around the fixed tokens, as diffusers' advanced script does).
    """

    tokens: tuple[str, ...] = ("<token>",)
    num_vectors: int = 1
    init_word: str = "*"
    templates: tuple[str, ...] | None = None
    embeddings_from: str | None = None
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"model.textual_inversion.train_fraction={self.train_fraction}: expected 0 < f <= 1")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.templates is not None:
            object.__setattr__(self, "templates", tuple(self.templates))
            if not self.templates or any("{}" not in t for t in self.templates):
                raise ConfigError(
                    f"model.textual_inversion.templates={list(self.templates)}: each needs {{}} where the token goes"
                )
        if not self.tokens or len(set(self.tokens)) != len(self.tokens) or any(not t.strip() for t in self.tokens):
            raise ConfigError(f"model.textual_inversion.tokens={list(self.tokens)}: give distinct, non-empty words")
        if self.num_vectors < 1:
            raise ConfigError(f"model.textual_inversion.num_vectors={self.num_vectors}: expected 1 or more")

    @classmethod
    def of(cls, value: TextualInversionSettings | Mapping[str, Any]) -> TextualInversionSettings:
        """The settings from themselves or a mapping of them (Hydra's ``_convert_: all`` gives a dict)."""
        return value if isinstance(value, cls) else cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "num_vectors": self.num_vectors, "init_word": self.init_word,
                "templates": list(self.templates) if self.templates else None,
                "embeddings_from": self.embeddings_from, "train_fraction": self.train_fraction}  # fmt: skip


class NewTokenEmbedding(torch.nn.Module):
    """A token embedding: the original table, frozen, and the new tokens' rows, trainable.

    Args:
        base: the text encoder's ``nn.Embedding`` ``(V, D)`` (its weight is frozen here).
        rows: the new tokens' initial rows ``(N, D)``; token id ``first_id + i`` reads row ``i``.
        first_id: the id of the first new token (ids are contiguous from it).
    """

    def __init__(self, base: torch.nn.Embedding, rows: torch.Tensor, first_id: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = torch.nn.Parameter(rows.detach().clone().to(base.weight.device, base.weight.dtype))
        self.first_id = first_id

    @property
    def weight(self) -> torch.Tensor:
        """The whole table ``(first_id + N, D)`` as one tensor (read-only use: a copy)."""
        return torch.cat([self.base.weight[: self.first_id], self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> embeddings ``(B, T, D)``; only positions of new tokens reach :attr:`rows`."""
        new = ids >= self.first_id  # (B, T)
        old = self.base(torch.where(new, torch.zeros_like(ids), ids))  # (B, T, D)
        index = (ids - self.first_id).clamp(0, self.rows.shape[0] - 1)
        return torch.where(new[..., None], self.rows[index].to(old.dtype), old)


@dataclass
class InstalledTokens:
    """The new tokens of one tokenizer/encoder pair.

    Attributes:
        tokens: per configured token, its vector tokens (``{"<d7>": ["<d7>", "<d7>_1"]}``).
        embedding: the encoder's :class:`NewTokenEmbedding` (its ``rows`` in the order of ``tokens``).
    """

    tokens: dict[str, list[str]] = field(default_factory=dict)
    embedding: NewTokenEmbedding | None = None

    def vectors(self) -> dict[str, torch.Tensor]:
        """Each token's rows ``(N_token, D)`` (detached)."""
        assert self.embedding is not None
        rows, out, start = self.embedding.rows.detach(), {}, 0
        for token, names in self.tokens.items():
            out[token] = rows[start : start + len(names)]
            start += len(names)
        return out


def init_rows(tokenizer: CLIPTokenizer, encoder: TextEncoder, init_word: str, num_vectors: int) -> torch.Tensor:
    """``num_vectors`` rows ``(N, D)`` from ``init_word``'s token embeddings, its tokens taken in turn.

    Raises:
        ConfigError: the word has no tokens.
    """
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"model.textual_inversion.init_word={init_word!r}: no tokens; give a word, e.g. 'object'")
    table = encoder.get_input_embeddings().weight.detach()
    return torch.stack([table[ids[i % len(ids)]] for i in range(num_vectors)]).float()


def install_tokens(
    tokenizer: CLIPTokenizer,
    encoder: TextEncoder,
    tokens: Sequence[str],
    initial: Mapping[str, torch.Tensor],
) -> InstalledTokens:
    """Add ``tokens`` (each with its initial rows ``(N_token, D)``) to ``tokenizer``, freeze ``encoder`` and give it
    a :class:`NewTokenEmbedding` whose rows are the only trainable weights.

    Raises:
        ConfigError: a token (or one of its vector tokens) is already a word of the tokenizer.
    """
    names = {token: vector_tokens(token, int(initial[token].shape[0])) for token in tokens}
    flat = [name for token in tokens for name in names[token]]
    known = [name for name in flat if name in tokenizer.get_vocab()]
    if known:
        raise ConfigError(
            f"model.textual_inversion.tokens: {known} already in the tokenizer's vocabulary; choose new words "
            "(e.g. '<my-thing>')"
        )
    first_id = len(tokenizer)
    tokenizer.add_tokens(flat)
    ids = tokenizer.convert_tokens_to_ids(flat)
    if ids != list(range(first_id, first_id + len(flat))):
        raise ConfigError(f"the tokenizer gave the new tokens ids {ids}, expected consecutive from {first_id}")
    base = encoder.get_input_embeddings()
    if base.weight.shape[0] < first_id:
        raise ConfigError(
            f"the text encoder has {base.weight.shape[0]} token rows but the tokenizer {first_id} words: a tokenizer "
            "of another model"
        )
    encoder.requires_grad_(False)
    rows = torch.cat([initial[token].to(base.weight.device) for token in tokens])  # (N, D)
    embedding = NewTokenEmbedding(base, rows, first_id)
    encoder.set_input_embeddings(embedding)
    return InstalledTokens(names, embedding)
