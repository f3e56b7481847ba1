"""The frozen VAE encoder and CLIP text encoder(s) that turn raw samples into latent-shard samples.

With a second text encoder (a ``CLIPTextModelWithProjection``) the encoders are SDXL's: captions give
both encoders' penultimate states and the pooled embedding (:mod:`data_pipelines.latents.sdxl_text`).

The VAE's float16 overflow: SDXL's VAE overflows in float16 (NaN latents at 1024 px). With
``dtype=float16`` and a second text encoder, the VAE is kept in float32 when its config says
``force_upcast`` (SDXL's does; diffusers' SDXL pipelines upcast it the same way) and the text encoders
run in float16; ``bfloat16`` has float32's range and encodes as is; ``float32`` is the default.
The dtype the VAE ran in is recorded in the manifest (``vae.extra.dtype``) and so in the cache key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.format import EncoderInfo
from data_pipelines.latents.sdxl_text import SDXL_TEXT_OUTPUT, encode_text_sdxl
from data_pipelines.latents.text_encoding import TextEncoding, chunked_token_ids, text_states
from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import model_folder


def fingerprint_folder(folder: str | Path) -> str:
    """SHA-256 over the names and bytes of every config and weight file in ``folder``."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".bin")
    )
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _recorded(given: str | Path, loaded: Path) -> str:
    """The path the manifest records for a folder: a URL as given, a local folder resolved (``loaded`` is the folder
    itself when local, a URL's copy otherwise: the URL is recorded, not the copy)."""
    return object_store.canonical(given)


def _require_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: {what} folder (diffusers/transformers layout with config.json) not found")
    return path


@torch.no_grad()
def encode_text(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, texts: list[str], encoding: TextEncoding | None = None
) -> torch.Tensor:
    """Captions -> the text encoder's hidden states ``(B, T, D)``: by default the last hidden state, padded to
    the tokenizer's ``model_max_length`` (as SD and diffusers' pipelines do); ``encoding`` sets long prompts
    and ``clip_skip`` (:func:`data_pipelines.latents.text_encoding.text_states`). Precompute and the sampler
    both use this, so training and sampling see the same embeddings. Each distinct text is encoded once."""
    unique = list(dict.fromkeys(texts))
    hidden, _ = text_states(tokenizer, text_encoder, unique, encoding)  # (U, T, D)
    return hidden[torch.tensor([unique.index(t) for t in texts], device=hidden.device)]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> this process's CUDA device (``LOCAL_RANK``, as torchrun sets it) when there is
    one, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


class FrozenEncoders:
    """A VAE, a text encoder and its tokenizer, frozen, in eval mode, on one device.

    Args:
        vae: the autoencoder (only its encoder is used).
        text_encoder: the CLIP text model.
        tokenizer: its tokenizer (captions are padded to ``tokenizer.model_max_length``).
        vae_info: identity of the VAE for the manifest.
        text_encoder_info: identity of the text encoder for the manifest.
        tokenizer_path: where the tokenizer was loaded from.
        tokenizer_fingerprint: SHA-256 of the tokenizer folder.
        text_encoder_2: SDXL's second text encoder (its pooled projection included), or ``None``.
        tokenizer_2: its tokenizer.
        text_encoder_2_info: its identity for the manifest.
        tokenizer_2_path: where its tokenizer was loaded from.
        tokenizer_2_fingerprint: SHA-256 of that tokenizer folder.
        text_encoding: long prompts (``max_token_length``) and ``clip_skip``; default: 75 tokens, the last layer.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        vae_info: EncoderInfo,
        text_encoder_info: EncoderInfo,
        tokenizer_path: str,
        tokenizer_fingerprint: str = "",
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2_info: EncoderInfo | None = None,
        tokenizer_2_path: str = "",
        tokenizer_2_fingerprint: str = "",
        text_encoding: TextEncoding | None = None,
    ) -> None:
        self.text_encoding = text_encoding or TextEncoding()
        self.text_encoding.check_sdxl(text_encoder_2 is not None)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae_info = vae_info
        self.text_encoder_info = text_encoder_info
        self.tokenizer_path = tokenizer_path
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2_info = text_encoder_2_info
        self.tokenizer_2_path = tokenizer_2_path
        self.tokenizer_2_fingerprint = tokenizer_2_fingerprint

    @property
    def sdxl(self) -> bool:
        """Whether these are SDXL's encoders (a second text encoder with a pooled projection)."""
        return self.text_encoder_2 is not None

    @property
    def text_output(self) -> str:
        """What the text encoders' outputs stored are, for the cache key ("" for SD 1.x/2.x's last hidden state
        of 75 tokens; long prompts and ``clip_skip`` add their settings)."""
        tag = self.text_encoding.cache_tag()
        return ";".join(part for part in (SDXL_TEXT_OUTPUT if self.sdxl else "", tag) if part)

    @classmethod
    def from_pretrained(
        cls,
        vae_path: str,
        text_encoder_path: str,
        tokenizer_path: str,
        device: str = "auto",
        dtype: str = "float32",
        text_encoder_2_path: str | None = None,
        tokenizer_2_path: str | None = None,
        cache_dir: str | None = None,
        text_encoding: TextEncoding | None = None,
    ) -> FrozenEncoders:
        """Load the parts from folders (no hub access); with ``text_encoder_2_path`` and
        ``tokenizer_2_path`` also SDXL's second text encoder (see the module docstring for the VAE's dtype).

        A folder may be a URL (``s3://bucket/sd15/vae``): it is loaded from its copy in the download cache
        (``cache_dir``, see :func:`lf_common.object_cache.model_folder`), and the URL is what the manifest
        records as its path; the fingerprint is that of the files, the same as for the folder on local disk.
        ``text_encoding`` (long prompts, ``clip_skip``) is recorded in the text encoder's ``extra``.

        Raises:
            DataError: a folder is missing or not in diffusers/transformers layout (an ``ObjectStoreError``
                naming the URL and the endpoint for a URL).
        """
        torch_device, torch_dtype = resolve_device(device), getattr(torch, dtype)
        text_encoding = text_encoding or TextEncoding()
        text_encoding.check_sdxl(bool(text_encoder_2_path))  # before any weights load
        vae_dir = _require_folder(model_folder(vae_path, cache_dir), "VAE")
        text_dir = _require_folder(model_folder(text_encoder_path, cache_dir), "text encoder")
        tokenizer_dir = _require_folder(model_folder(tokenizer_path, cache_dir), "tokenizer")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch_dtype)
        if text_encoder_2_path and torch_dtype == torch.float16 and vae.config.get("force_upcast", True):
            vae, dtype_vae = vae.to(torch.float32), "float32"  # SDXL's VAE overflows in float16
        else:
            dtype_vae = dtype
        vae = vae.to(torch_device)
        text_encoder = CLIPTextModel.from_pretrained(text_dir, local_files_only=True, dtype=torch_dtype).to(
            torch_device
        )
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        vae_info = EncoderInfo(
            path=_recorded(vae_path, vae_dir),
            class_name=type(vae).__name__,
            fingerprint=fingerprint_folder(vae_dir),
            extra={"scaling_factor": float(vae.config.scaling_factor), "dtype": dtype_vae},
        )
        text_info = EncoderInfo(
            path=_recorded(text_encoder_path, text_dir),
            class_name=type(text_encoder).__name__,
            fingerprint=fingerprint_folder(text_dir),
            extra={
                "max_length": int(tokenizer.model_max_length),
                "output": "hidden_states[-2]" if text_encoder_2_path else "last_hidden_state",
                "dtype": dtype,
                **text_encoding.record(),
            },
        )
        second: dict = {}
        if text_encoder_2_path:
            text_2_dir = _require_folder(model_folder(text_encoder_2_path, cache_dir), "second text encoder")
            tokenizer_2_dir = _require_folder(model_folder(tokenizer_2_path or "", cache_dir), "second tokenizer")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                text_2_dir, local_files_only=True, dtype=torch_dtype
            ).to(torch_device)
            tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_2_dir, local_files_only=True)
            second = {
                "text_encoder_2": text_encoder_2,
                "tokenizer_2": tokenizer_2,
                "text_encoder_2_info": EncoderInfo(
                    path=_recorded(text_encoder_2_path, text_2_dir),
                    class_name=type(text_encoder_2).__name__,
                    fingerprint=fingerprint_folder(text_2_dir),
                    extra={
                        "max_length": int(tokenizer_2.model_max_length),
                        "output": "hidden_states[-2]+text_embeds",
                        "dtype": dtype,
                    },
                ),
                "tokenizer_2_path": _recorded(tokenizer_2_path or "", tokenizer_2_dir),
                "tokenizer_2_fingerprint": fingerprint_folder(tokenizer_2_dir),
            }
        return cls(
            vae,
            text_encoder,
            tokenizer,
            vae_info,
            text_info,
            _recorded(tokenizer_path, tokenizer_dir),
            fingerprint_folder(tokenizer_dir),
            **second,
            text_encoding=text_encoding,
        )

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, C, H/f, W/f)`` (posterior mode)."""
        pixels = pixels.to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()  # (B, C, H/f, W/f)
        return latents * self.vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> text embeddings ``(B, T, D)``: the last hidden states (see :func:`encode_text`), or
        SDXL's two penultimate states concatenated ``(B, T, D1 + D2)``."""
        return self.encode_text_and_pooled(captions)[0]

    def encode_text_and_pooled(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions -> ``(text (B, T, D), pooled (B, P))``; ``pooled`` is ``None`` without a second encoder."""
        if self.text_encoder_2 is None:
            return encode_text(self.tokenizer, self.text_encoder, captions, self.text_encoding), None
        tokenizers, encoders = [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
        return encode_text_sdxl(tokenizers, encoders, captions, encoding=self.text_encoding)

    def token_ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions -> the token ids their text embeddings are encoded from: ``(B, n, L)`` int64 of the
        tokenizer (``n`` chunks of its ``model_max_length`` ``L``, :func:`chunked_token_ids` with this
        :attr:`text_encoding`), and SDXL's second tokenizer's ``(B, n, L)`` (``None`` without one)."""
        chunks = self.text_encoding.chunks
        second = chunked_token_ids(self.tokenizer_2, captions, chunks) if self.tokenizer_2 is not None else None
        return chunked_token_ids(self.tokenizer, captions, chunks), second
