"""A folder of images, each captioned by a same-named ``.txt`` file (kohya's and DreamBooth's layout).

An image may have a loss mask beside it: ``KEY.mask.png`` next to ``KEY.jpg`` (grayscale, the image's size;
white: the loss counts, black: it is ignored). Files named ``*.mask.png`` are masks, never training images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from data_pipelines.raw.sources.base import SourceItem
from lf_common.errors import ConfigError, DataError

FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"


def mask_path(image: Path) -> Path:
    """Where an image's loss mask lies: ``photo.jpg`` -> ``photo.mask.png``."""
    return image.with_name(image.stem + MASK_SUFFIX)


class ImageFolderSource:
    """Images under ``root`` (sorted by path), with captions from ``<image stem>.txt``.

    Args:
        root: the folder.
        recursive: also look in subfolders.
        missing_caption: ``"error"`` stops at an image without a caption file, ``"skip"`` leaves
            it out (with a warning), ``"empty"`` gives it the empty caption.
    """

    def __init__(
        self, root: str, recursive: bool = True, missing_caption: Literal["error", "skip", "empty"] = "error"
    ) -> None:
        self.root = Path(root)
        self.recursive = recursive
        if missing_caption not in ("error", "skip", "empty"):
            raise ConfigError(f"missing_caption={missing_caption!r}: expected 'error', 'skip' or 'empty'")
        self.missing_caption = missing_caption
        self.skipped: list[str] = []

    def image_paths(self) -> list[Path]:
        """Every image file under the root, sorted.

        Raises:
            DataError: the root is missing, not a folder, or holds no image.
        """
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder does not exist or is not a folder")
        pattern = "**/*" if self.recursive else "*"
        paths = sorted(
            p
            for p in self.root.glob(pattern)
            if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and not p.name.lower().endswith(MASK_SUFFIX)
        )
        if not paths:
            raise DataError(f"{self.root}: no images found (looked for {', '.join(FOLDER_IMAGE_SUFFIXES)})")
        return paths

    def __len__(self) -> int:
        """Images found (those left out for a missing caption included)."""
        return len(self.image_paths())

    def __iter__(self) -> Iterator[SourceItem]:
        for path in self.image_paths():
            caption_path = path.with_suffix(".txt")
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8").strip()
            elif self.missing_caption == "error":
                raise DataError(
                    f"{path}: caption file {caption_path.name} is missing "
                    "(set source.missing_caption=skip or =empty to go on without it)"
                )
            elif self.missing_caption == "skip":
                self.skipped.append(str(path))
                continue
            else:
                caption = ""
            mask = mask_path(path)
            yield SourceItem(
                origin=str(path),
                image_bytes=path.read_bytes(),
                caption=caption,
                meta={"source_path": str(path.relative_to(self.root))},
                mask_bytes=mask.read_bytes() if mask.is_file() else None,
                mask_origin=str(mask),
            )
