"""``lf-dedup`` on real digits with planted duplicates: exact copies, JPEG re-encodes and copies shifted
by a pixel are all found, no two distinct digits are grouped, and the output passes validation."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image, ImageChops

from data_pipelines.raw.dedup import dedup_shards
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.sources.digits import DigitsSource
from data_pipelines.raw.validate import validate_shards
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.listing import resolve_shards
from tests.conftest import compose_config
from trainer.cli.dedup import embedder, run_dedup
from trainer.evaluation.features import FeatureExtractor

ORIGINALS = 150
EXACT, REENCODED, SHIFTED = (3, 17, 140), (5, 60, 99), (8, 77, 110)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def planted_source() -> tuple[list[SourceItem], dict[str, tuple[str, str]]]:
    """150 real digits, then copies of some: same bytes, JPEG quality 90, shifted one pixel right
    and down. Returns the items and, per copy's key, the original's key and the expected reason."""
    items = list(DigitsSource("train", limit=ORIGINALS))
    expected = {}
    copies = [(i, "exact") for i in EXACT] + [(i, "near") for i in REENCODED] + [(i, "near") for i in SHIFTED]
    for number, (original, reason) in enumerate(copies):
        image = Image.open(io.BytesIO(items[original].image_bytes)).convert("RGB")
        if original in EXACT:
            data = items[original].image_bytes
        elif original in REENCODED:
            data = _encoded(image, "JPEG", quality=90)
        else:
            data = _encoded(ImageChops.offset(image, 1, 1), "PNG")
        items.append(SourceItem(f"copy-{number}", data, items[original].caption))
        expected[f"{ORIGINALS + number:09d}"] = (f"{original:09d}", reason)
    return items, expected


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    items, expected = planted_source()
    write_raw_shards(items, folder, samples_per_shard=64)  # 159 samples in 3 shards
    return folder, expected


def test_all_planted_duplicates_are_found_and_no_distinct_digits_grouped(planted, tmp_path):
    shards, expected = planted
    overrides = [f"shards={shards}", f"out_dir={tmp_path / 'dedup'}", "workers=2", "samples_per_shard=100"]
    report = run_dedup(compose_config("dedup", overrides))

    found = {}
    for group in report["groups"]:
        for duplicate in group["duplicates"]:
            found[duplicate["sample"].split(":")[1]] = (group["kept"].split(":")[1], duplicate["reason"])
    assert found == expected, "each planted copy, in a group with its original, for the planted reason"
    assert len(report["groups"]) == len(expected), "no group among the 150 originals"
    assert report["by_reason"] == {"exact": 3, "near": 6}
    assert (report["samples"], report["kept"], report["dropped"]) == (159, 150, 9)

    validation = validate_shards(report["shards"])
    assert all(r.ok for r in validation) and sum(r.samples for r in validation) == 150
    written = json.loads((tmp_path / "dedup" / "dedup_report.json").read_text())
    assert written["groups"] == report["groups"]


class BlockMeans(FeatureExtractor):
    """A stand-in for CLIP's image embeddings: the 8 x 8 grayscale block means (64 features)."""

    num_features = 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
        return torch.nn.functional.adaptive_avg_pool2d(gray, 8).flatten(1)  # (B, 64)


def test_optional_embedding_search_finds_reencoded_copies_by_cosine_similarity(planted):
    """Hash candidates off (identical thumbnails only): the JPEG copies are found by their embeddings
    (cosine 0.99999 with their originals; distinct digits reach 0.994), nothing else is grouped."""
    shards, expected = planted
    embed = embedder(BlockMeans(), 32)
    report = dedup_shards(
        resolve_shards(str(shards)), None, max_hash_distance=0, max_pixel_difference=0.0, embed=embed, min_cosine=0.9999
    ).to_dict()
    reasons = {d["sample"].split(":")[1]: d["reason"] for g in report["groups"] for d in g["duplicates"]}
    reencoded = {key for key, (original, _) in expected.items() if int(original) in REENCODED}
    assert {key for key, reason in reasons.items() if reason == "embedding"} == reencoded
    assert set(reasons) <= set(expected), "only planted copies are grouped"
    assert report["shards"] == [], "out_dir=None: a dry run, no shards written"
