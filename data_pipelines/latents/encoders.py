"""The frozen VAE encoder and CLIP text encoder that turn raw samples into latent-shard samples."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from data_pipelines.latents.format import EncoderInfo
from lf_common.errors import DataError


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


def _require_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: {what} folder (diffusers/transformers layout with config.json) not found")
    return path


@torch.no_grad()
def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, texts: list[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden state ``(B, T, D)``, padded to the tokenizer's
    ``model_max_length`` (as SD and diffusers' pipelines do). Precompute and the sampler both use
    this, so training and sampling see the same embeddings. Each distinct text is encoded once."""
    unique = list(dict.fromkeys(texts))
    length = tokenizer.model_max_length
    tokens = tokenizer(unique, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(tokens.input_ids.to(device)).last_hidden_state  # (U, T, D)
    return hidden[torch.tensor([unique.index(t) for t in texts], device=device)]


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
    ) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae_info = vae_info
        self.text_encoder_info = text_encoder_info
        self.tokenizer_path = tokenizer_path
        self.tokenizer_fingerprint = tokenizer_fingerprint

    @classmethod
    def from_pretrained(
        cls,
        vae_path: str,
        text_encoder_path: str,
        tokenizer_path: str,
        device: str = "auto",
        dtype: str = "float32",
    ) -> FrozenEncoders:
        """Load the three parts from local folders (no hub access).

        Raises:
            DataError: a folder is missing or not in diffusers/transformers layout.
        """
        torch_device, torch_dtype = resolve_device(device), getattr(torch, dtype)
        vae_dir = _require_folder(vae_path, "VAE")
        text_dir = _require_folder(text_encoder_path, "text encoder")
        tokenizer_dir = _require_folder(tokenizer_path, "tokenizer")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch_dtype).to(torch_device)
        text_encoder = CLIPTextModel.from_pretrained(text_dir, local_files_only=True, dtype=torch_dtype).to(
            torch_device
        )
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        vae_info = EncoderInfo(
            path=str(vae_dir.resolve()),
            class_name=type(vae).__name__,
            fingerprint=fingerprint_folder(vae_dir),
            extra={"scaling_factor": float(vae.config.scaling_factor), "dtype": dtype},
        )
        text_info = EncoderInfo(
            path=str(text_dir.resolve()),
            class_name=type(text_encoder).__name__,
            fingerprint=fingerprint_folder(text_dir),
            extra={"max_length": int(tokenizer.model_max_length), "output": "last_hidden_state", "dtype": dtype},
        )
        return cls(
            vae,
            text_encoder,
            tokenizer,
            vae_info,
            text_info,
            str(tokenizer_dir.resolve()),
            fingerprint_folder(tokenizer_dir),
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
        """Captions -> last hidden states ``(B, T, D)`` (see :func:`encode_text`)."""
        return encode_text(self.tokenizer, self.text_encoder, captions)
