"""Generation parameters in a PNG text chunk, in the layout AUTOMATIC1111 writes and reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"


@dataclass
class GenerationParameters:
    """What re-makes one image."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str = ""
    strength: float | None = None
    guidance_rescale: float = 0.0

    def to_text(self) -> str:
        """The A1111 ``parameters`` text: prompt, ``Negative prompt: ...``, then ``Key: value`` pairs."""
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
        ]
        if self.model:
            fields.append(f"Model: {self.model}")
        if self.guidance_rescale:
            fields.append(f"CFG Rescale phi: {self.guidance_rescale:g}")
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: GenerationParameters) -> Path:
    """Save ``image`` as PNG with ``parameters`` in its ``parameters`` text chunk."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters.to_text())
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | Path) -> str:
    """The ``parameters`` text of a PNG (empty when it has none)."""
    with Image.open(path) as image:
        return image.text.get(PARAMETERS_KEY, "")  # type: ignore[attr-defined]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row, ``columns`` per row."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
