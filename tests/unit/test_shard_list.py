import pytest

from data_pipelines.shards.listing import resolve_shards
from lf_common.errors import DataError


def test_folder_glob_brace_and_list(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    every = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(tmp_path)) == every
    assert resolve_shards(str(tmp_path / "*.tar")) == every
    assert resolve_shards(str(tmp_path / "shard-{000000..000001}.tar")) == every[:2]
    assert resolve_shards([every[2], every[0]]) == [every[2], every[0]]


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=r"absent\.tar: shard path does not exist"):
        resolve_shards(str(tmp_path / "absent.tar"))
    with pytest.raises(DataError, match=r"folder holds no \.tar shards"):
        resolve_shards(str(tmp_path))
    with pytest.raises(DataError, match=r"no shard matches this pattern"):
        resolve_shards(str(tmp_path / "*.tar"))


def test_urls_and_pipes_pass_through():
    urls = resolve_shards(["pipe:cat /data/shard-{000000..000001}.tar", "https://host/s-000.tar"])
    assert urls == ["pipe:cat /data/shard-000000.tar", "pipe:cat /data/shard-000001.tar", "https://host/s-000.tar"]
