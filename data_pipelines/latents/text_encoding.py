"""Captions -> CLIP hidden states, the one recipe for precompute, in-step encoding (DreamBooth) and the sampler:
long prompts in chunks (``max_token_length``) and the layer read (``clip_skip``).

Long prompts follow kohya-ss/sd-scripts (``library/train_util.py``: ``get_input_ids`` and
``get_hidden_states``; ``max_token_length`` 150 or 225): the caption is tokenized to
``max_token_length + 2`` tokens, cut into ``n = max_token_length / 75`` chunks of 75 tokens, and each chunk
is wrapped in BOS ... EOS and encoded on its own (``(B * n, 77)``). Of the ``n`` encoded chunks the first
chunk's BOS state, every chunk's 75 inner states and the last chunk's final state are kept, so the states are
``(B, max_token_length + 2, D)``: 77, 152 or 227 tokens. With SD 2.x / SDXL tokenizers, which pad with
another token than EOS, a chunk whose text runs on ends with EOS and a chunk that starts in the padding starts
with EOS (kohya's rule). SDXL's pooled embedding is the first chunk's. (AUTOMATIC1111 concatenates the whole
77-token chunks instead, keeping every chunk's BOS and EOS states, ``77 n`` tokens, and breaks chunks at
commas; its embeddings of prompts past 75 tokens differ from these.) ``max_token_length`` 75, one chunk, is
the plain encoding: the tokenizer's ``model_max_length`` tokens, as diffusers' pipelines encode.

``clip_skip`` follows AUTOMATIC1111's numbering: 1 reads the last layer (``last_hidden_state``), 2 the
penultimate, ``k`` the ``k``-th from the end, each through the encoder's ``final_layer_norm`` -- diffusers'
``StableDiffusionPipeline.encode_prompt(clip_skip=k - 1)``. SDXL reads its encoders' penultimate states
without the final norm by design, so ``clip_skip`` is refused there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lf_common.errors import ConfigError

if TYPE_CHECKING:  # the settings are read by entry points before torch loads; the functions import it
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CHUNK_TOKENS = 75  # the caption tokens of one CLIP context (77 with BOS and EOS)
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextEncoding:
    """How captions are encoded besides the encoders themselves; recorded in the latent manifest
    (``text_encoder.extra``) and, through it, in the export, so the sampler encodes prompts the same way.

    Attributes:
        max_token_length: 75 (one chunk: the tokenizer's length, the default), 150 or 225 (two or three chunks).
        clip_skip: 1 reads the last layer, 2 the penultimate (SD 1.x/2.x only).
    """

    max_token_length: int = CHUNK_TOKENS
    clip_skip: int = 1

    def __post_init__(self) -> None:
        if self.max_token_length not in MAX_TOKEN_LENGTHS:
            raise ConfigError(f"max_token_length={self.max_token_length}: expected one of {list(MAX_TOKEN_LENGTHS)}")
        if self.clip_skip < 1:
            raise ConfigError(f"clip_skip={self.clip_skip}: expected 1 (the last layer), 2 (penultimate) or more")

    @property
    def chunks(self) -> int:
        """Encoder contexts per caption."""
        return self.max_token_length // CHUNK_TOKENS

    def check_sdxl(self, sdxl: bool) -> None:
        """Refuse ``clip_skip`` for SDXL's encoders.

        Raises:
            ConfigError: ``clip_skip`` > 1 with SDXL.
        """
        if sdxl and self.clip_skip != 1:
            raise ConfigError(
                f"clip_skip={self.clip_skip}: SDXL already reads its text encoders' penultimate layer; "
                "leave clip_skip at 1"
            )

    def record(self) -> dict[str, int]:
        """The settings as the manifest records them."""
        return asdict(self)

    @classmethod
    def recorded(cls, extra: dict[str, Any] | None) -> TextEncoding:
        """The settings a manifest's ``text_encoder.extra`` records (the defaults where it records none)."""
        extra = extra or {}
        return cls(int(extra.get("max_token_length", CHUNK_TOKENS)), int(extra.get("clip_skip", 1)))

    def cache_tag(self) -> str:
        """What the cache key's ``text_output`` adds ("" for the defaults, so older shards stay current)."""
        parts = [f"{k}={v}" for k, v in self.record().items() if v != getattr(TextEncoding(), k)]
        return ";".join(parts)


def chunked_token_ids(tokenizer: CLIPTokenizer, texts: list[str], chunks: int = 1) -> torch.Tensor:
    """Captions -> token ids ``(B, n, L)``: ``n`` chunks of the tokenizer's ``model_max_length`` ``L``, each
    BOS + ``L - 2`` caption tokens + EOS/padding (kohya's rule, see the module docstring)."""
    import torch

    length = tokenizer.model_max_length
    inner = length - 2
    ids = tokenizer(
        texts, padding="max_length", max_length=chunks * inner + 2, truncation=True, return_tensors="pt"
    ).input_ids  # (B, n * (L - 2) + 2)
    if chunks == 1:
        return ids[:, None]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    parts = []
    for index in range(chunks):
        body = ids[:, 1 + index * inner : 1 + (index + 1) * inner]
        chunk = torch.cat([ids[:, :1], body, ids[:, -1:]], dim=1)  # (B, L)
        if pad != eos:  # SD 2.x / SDXL tokenizers: close a running chunk with EOS, open an empty one with EOS
            runs_on = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[:, -1] = torch.where(runs_on, eos, chunk[:, -1])
            chunk[:, 1] = torch.where(chunk[:, 1] == pad, eos, chunk[:, 1])
        parts.append(chunk)
    return torch.stack(parts, dim=1)


def text_states(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    texts: list[str],
    encoding: TextEncoding | None = None,
    penultimate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions -> ``(states (B, T, D), pooled (B, P) or None)``, with gradients where the encoder trains:
    :func:`chunked_token_ids`, then :func:`token_id_states` (the one recipe).

    Args:
        tokenizer, text_encoder: a CLIP tokenizer and text model.
        texts: ``B`` captions.
        encoding: ``max_token_length`` (``T = max_token_length + 2``) and ``clip_skip``; default: 75 and 1.
        penultimate: SDXL's reading: ``hidden_states[-2]`` without the final norm (``clip_skip`` ignored).

    Returns:
        The states, and the projected pooled output of a ``CLIPTextModelWithProjection`` (its first chunk's).
    """
    encoding = encoding or TextEncoding()
    ids = chunked_token_ids(tokenizer, texts, encoding.chunks)  # (B, n, L)
    return token_id_states(text_encoder, ids, encoding, penultimate)


def encode_token_ids(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    ids: torch.Tensor,
    encoding: TextEncoding | None = None,
) -> torch.Tensor:
    """Token ids ``(B, n, L)`` (:func:`chunked_token_ids`, as latent shards keep them) -> hidden states
    ``(B, n (L - 2) + 2, D)`` (77 for one chunk), exactly what precompute stored for the same caption; with
    gradients where the encoder trains (``lf-train model.train_text_encoder=true``).

    Args:
        text_encoder: a CLIP text model (SD 1.x/2.x's; SDXL's pair: :func:`data_pipelines.latents.sdxl_text.
            encode_token_ids_sdxl`).
        ids: ``n`` chunks of ``L`` ids per caption (``n = encoding.chunks``).
        encoding: ``clip_skip`` (the layer read); default: the last layer.
    """
    return token_id_states(text_encoder, ids, encoding)[0]


def token_id_states(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    ids: torch.Tensor,
    encoding: TextEncoding | None = None,
    penultimate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids ``(B, n, L)`` -> ``(states (B, n (L - 2) + 2, D), pooled (B, P) or None)``: each chunk encoded on
    its own, the layer ``clip_skip`` reads (or SDXL's ``penultimate``), the chunks joined as the module docstring
    says; the pooled projection (a ``CLIPTextModelWithProjection``'s) of the first chunk."""
    import torch

    encoding = encoding or TextEncoding()
    batch, chunks, _ = ids.shape
    device = next(text_encoder.parameters()).device
    hidden_needed = penultimate or encoding.clip_skip > 1
    output = text_encoder(ids.flatten(0, 1).to(device, torch.long), output_hidden_states=hidden_needed)
    if penultimate:
        states = output.hidden_states[-2]  # (B * n, L, D)
    elif encoding.clip_skip > 1:
        model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests the layers; 5 does not
        states = model.final_layer_norm(output.hidden_states[-encoding.clip_skip])
    else:
        states = output.last_hidden_state
    states = states.unflatten(0, (batch, chunks))  # (B, n, L, D)
    if chunks > 1:  # first BOS, every chunk's inner states, the last chunk's final state
        states = torch.cat([states[:, 0, :1], states[:, :, 1:-1].flatten(1, 2), states[:, -1, -1:]], dim=1)
    else:
        states = states[:, 0]
    pooled = getattr(output, "text_embeds", None)
    if pooled is not None:
        pooled = pooled.unflatten(0, (batch, chunks))[:, 0]  # (B, P): the first chunk's, as kohya
    return states, pooled
