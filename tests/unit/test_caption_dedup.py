"""Precompute runs the text encoder once per distinct caption of a batch, not once per sample."""

import torch

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.format import ShardEntry
from data_pipelines.latents.precompute import file_sha256
from data_pipelines.latents.shard_encoder import LatentShardEncoder
from data_pipelines.transforms.images import ResizeCrop


def encoders(pretrained_dir) -> FrozenEncoders:
    root = str(pretrained_dir)
    return FrozenEncoders.from_pretrained(f"{root}/vae", f"{root}/text_encoder", f"{root}/tokenizer", device="cpu")


def count_rows(module: torch.nn.Module) -> list[int]:
    """Rows of every forward call of ``module``."""
    rows: list[int] = []
    module.register_forward_pre_hook(lambda _, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    return rows


def test_each_distinct_caption_is_encoded_once(pretrained_dir):
    frozen = encoders(pretrained_dir)
    rows = count_rows(frozen.text_encoder)
    captions = ["a cat", "a dog", "a cat", "a cat", "", "a dog"]
    hidden = frozen.encode_captions(captions)  # (6, T, D)
    assert rows == [3]
    assert torch.equal(hidden[0], hidden[2]) and torch.equal(hidden[1], hidden[5])
    alone = frozen.encode_captions(["a dog"])[0]
    torch.testing.assert_close(hidden[1], alone)


def test_precompute_batches_encode_unique_captions_only(pretrained_dir, raw_shards, tmp_path):
    frozen = encoders(pretrained_dir)
    rows = count_rows(frozen.text_encoder)
    encoder = LatentShardEncoder(frozen, ResizeCrop(32), batch_size=16)
    source = str(sorted(raw_shards.glob("*.tar"))[0])
    entry: ShardEntry = encoder.encode_shard(source, tmp_path / "out.tar", encoder.cache_key(file_sha256(source)))
    assert entry.num_samples == 32
    assert len(rows) == 2 and all(r <= 10 for r in rows), "ten digit captions at most per batch of 16"
