"""A small CLIP trained in seconds on the digits, so that its score means something: images of a
digit agree with "a handwritten digit <that digit>" more than with another digit's caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from data_pipelines.latents.tokenizer import build_clip_tokenizer
from data_pipelines.raw.sources.digits import digit_caption, digit_to_image, digits_split


def train_tiny_clip(out: Path, steps: int = 150, size: int = 32, seed: int = 0) -> Path:
    """Train a two-tower CLIP (one layer each, 32 wide) to match training digits with their captions
    (cross-entropy of each image over the ten captions) and save model and processor to ``out``."""
    tokenizer = build_clip_tokenizer(max_length=8)
    text = {"vocab_size": 49408, "max_position_embeddings": 8, "bos_token_id": 49406, "eos_token_id": 49407}
    text["pad_token_id"] = 49407
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, **text},
        vision_config={**tower, "image_size": size, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # larger input embeddings than CLIP's 0.02 init: words and strokes stand out at once
        model.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
        model.vision_model.embeddings.patch_embedding.weight.normal_(0.0, 0.5)
    size_spec = {"shortest_edge": size}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size_spec, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    digits, labels, _ = digits_split("train")
    pixels = processor(images=[digit_to_image(d, size) for d in digits[:500]], return_tensors="pt")["pixel_values"]
    targets = torch.as_tensor(labels[:500])
    captions = processor.tokenizer([digit_caption(d) for d in range(10)], return_tensors="pt", padding="max_length")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        for _ in range(steps):
            batch = torch.randint(0, len(targets), (64,), generator=generator)
            logits = model(**captions, pixel_values=pixels[batch]).logits_per_image  # (64, 10)
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def digit_images(split: str, count: int, size: int = 32) -> tuple[list, np.ndarray]:
    """The first ``count`` digits of a split as RGB images, with their labels."""
    digits, labels, _ = digits_split(split)  # type: ignore[arg-type]
    return [digit_to_image(d, size) for d in digits[:count]], labels[:count]
