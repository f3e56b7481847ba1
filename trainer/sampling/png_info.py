"""Generation parameters in a PNG text chunk, in the layout AUTOMATIC1111 writes and reads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt: "
# One "Key: value" pair of the last line; a value may be quoted (AUTOMATIC1111's own pattern).
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass
class GenerationParameters:
    """What re-makes one image.

    SDXL's micro-conditioning, when not the defaults, is written as ``Original size: WxH`` and
    ``Crop offset: LEFTxTOP`` (x before y, as ``Size``); the attributes are ``(h, w)`` and ``(top, left)``.
    SDXL's second encoder's texts, when given, as ``Prompt 2: "..."`` and ``Negative prompt 2: "..."``
    (JSON-quoted, as AUTOMATIC1111 quotes values with commas). A ``clip_skip`` other than 1 as
    ``Clip skip: N`` (AUTOMATIC1111's field).
    """

    prompt: str
    negative_prompt: str | None  # None: none given (no "Negative prompt:" line); "" is written as an empty one
    steps: int
    sampler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str = ""
    strength: float | None = None
    guidance_rescale: float = 0.0
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    clip_skip: int = 1

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
        if self.original_size is not None:
            fields.append(f"Original size: {self.original_size[1]}x{self.original_size[0]}")
        if tuple(self.crop_top_left) != (0, 0):
            fields.append(f"Crop offset: {self.crop_top_left[1]}x{self.crop_top_left[0]}")
        if self.prompt_2 is not None:
            fields.append(f"Prompt 2: {json.dumps(self.prompt_2)}")
        if self.negative_prompt_2 is not None:
            fields.append(f"Negative prompt 2: {json.dumps(self.negative_prompt_2)}")
        if self.clip_skip != 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        lines = [self.prompt]
        if self.negative_prompt is not None:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def parse_parameters(text: str, source: str = "parameters") -> GenerationParameters:
    """Read the text :meth:`GenerationParameters.to_text` (or AUTOMATIC1111) writes.

    Raises:
        ValueError: a required field (Steps, Sampler, CFG scale, Seed, Size) is missing; names ``source``.
    """
    lines = text.strip("\n").split("\n")
    fields = dict(FIELD.findall(lines[-1])) if lines and FIELD.match(lines[-1]) else {}
    body = lines[:-1] if fields else lines
    prompt_lines, negative_lines, negative = [], [], False
    for line in body:
        if line.startswith(NEGATIVE_PREFIX):
            negative, line = True, line[len(NEGATIVE_PREFIX) :]
        (negative_lines if negative else prompt_lines).append(line)
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in fields]
    if missing:
        raise ValueError(f"{source}: the parameters text lacks {missing}; got {text!r}")
    width, height = _pair(fields["Size"])
    original = _pair(fields["Original size"])[::-1] if "Original size" in fields else None
    crop = _pair(fields["Crop offset"])[::-1] if "Crop offset" in fields else (0, 0)
    strength = fields.get("Denoising strength")
    sampler = fields["Sampler"]
    if fields.get("Schedule type") == "Karras" and not sampler.endswith(" Karras"):
        sampler += " Karras"  # AUTOMATIC1111 1.9+ writes the schedule apart from the sampler
    return GenerationParameters(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines) if negative else None,
        steps=int(fields["Steps"]),
        sampler=sampler,
        guidance_scale=float(fields["CFG scale"]),
        seed=int(fields["Seed"]),
        width=width,
        height=height,
        model=fields.get("Model", ""),
        strength=float(strength) if strength is not None else None,
        guidance_rescale=float(fields.get("CFG Rescale phi", 0.0)),
        original_size=original,
        crop_top_left=crop,
        prompt_2=_unquote(fields["Prompt 2"]) if "Prompt 2" in fields else None,
        negative_prompt_2=_unquote(fields["Negative prompt 2"]) if "Negative prompt 2" in fields else None,
        clip_skip=int(fields.get("Clip skip", 1)),
    )


def _unquote(value: str) -> str:
    """A field's value, JSON-unquoted when quoted."""
    return json.loads(value) if value.startswith('"') else value


def _pair(text: str) -> tuple[int, int]:
    """``"AxB"`` -> ``(A, B)``."""
    first, second = (int(v) for v in text.split("x"))
    return first, second


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
