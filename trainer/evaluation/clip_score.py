"""CLIP score (Hessel et al. 2021, "CLIPScore"): how well images agree with their prompts, by
torchmetrics' ``CLIPScore``, with a CLIP model from a local folder loaded strictly.

The score is ``max(100 * mean cosine(image embedding, prompt embedding), 0)``. Its scale depends
on the CLIP model: compare scores made with the same one (SD papers use ViT-L/14).

torchmetrics 1.9.0 reads ``get_image_features`` / ``get_text_features`` as tensors, which
transformers 5 returns wrapped in a model output (torchmetrics issue #3407, fixed after 1.9.0);
:class:`_ProjectedFeatures` hands it the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from lf_common.errors import DataError
from lf_common.object_cache import model_folder
from trainer.evaluation.features import FeatureExtractor, tensor_to_images, tensors_fingerprint


def load_clip(folder: str | Path, download_cache_dir: str | Path | None = None) -> tuple[CLIPModel, CLIPProcessor]:
    """A ``CLIPModel`` and its ``CLIPProcessor`` from a folder (transformers layout: ``config.json``,
    ``model.safetensors``, the tokenizer and preprocessor files): local, or a URL (``s3://...``)
    downloaded once into ``download_cache_dir`` (``None``: ``$LF_CACHE_DIR``, else the default).

    Raises:
        DataError: the folder is missing, or its weights do not match its config key for key.
        ObjectStoreError: nothing is under the URL (one line naming it).
    """
    folder = Path(model_folder(folder, download_cache_dir))
    if not (folder / "config.json").is_file():
        raise DataError(
            f"{folder}: not a CLIP model folder (config.json is missing); save one with "
            "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained, e.g. openai/clip-vit-large-patch14"
        )
    model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        found = "; ".join(f"{kind} {sorted(map(str, keys))[:3]}" for kind, keys in problems.items())
        raise DataError(f"{folder}: the weights do not match the CLIP config: {found}")
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval().requires_grad_(False), processor


def _tensor(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected embedding, 5 a model output holding it as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the projected embeddings ``(B, P)`` as tensors."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values, **kwargs))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return _tensor(self.model.get_text_features(input_ids, attention_mask, **kwargs))


def clip_score_metric(folder: str | Path, download_cache_dir: str | Path | None = None) -> CLIPScore:
    """torchmetrics' ``CLIPScore`` with the CLIP model in ``folder`` (see :func:`load_clip`).

    Its states are sums, so ranks that each ``update`` with their own images get the score over
    all images from ``compute()`` (called by every rank).
    """
    model, processor = load_clip(folder, download_cache_dir)
    return CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))


class ClipImageFeatures(FeatureExtractor):
    """CLIP image embeddings of uint8 images ``(B, 3, H, W)`` -> ``(B, P)`` (e.g. for duplicate search
    by cosine similarity, or a Fréchet distance in CLIP space).

    Args:
        folder: a CLIP folder, local or a URL (see :func:`load_clip`).
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        model, self.processor = load_clip(folder)
        self.model = _ProjectedFeatures(model)
        self.num_features = model.config.projection_dim

    def fingerprint(self) -> str:
        settings = self.processor.image_processor.to_dict()
        return tensors_fingerprint(type(self).__name__, self.model.state_dict(), settings)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=tensor_to_images(images), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixels.to(images.device))  # (B, P)
