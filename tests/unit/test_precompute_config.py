"""lf-precompute refuses a count key out of range at config time: one line naming the key and the expectation,
exit 2, before any shard is listed or torch is imported (it used to fail after loading the encoders)."""

from __future__ import annotations

from tests.unit.test_cli_startup import USER_ERROR_EXIT, error_lines, run_lines

PATHS = ["shards=nonexistent", "out_dir=latents", "pretrained=nonexistent-model"]


def test_counts_out_of_range_are_refused_in_one_line_without_torch(tmp_path):
    bad = ["crops_per_image=-1", "crops_per_image=two", "batch_size=0", "resolution=0"]
    results = run_lines(tmp_path, [["lf-precompute", *PATHS, arg] for arg in bad])
    expected = [
        "crops_per_image=-1: expected a whole number, 0 or more",
        "crops_per_image=two: expected a whole number, 0 or more",
        "batch_size=0: expected a whole number, 1 or more",
        "resolution=0: expected a whole number, 1 or more",
    ]
    for result, message in zip(results, expected, strict=True):
        assert result["exit"] == USER_ERROR_EXIT, result["stderr"][-2000:]
        assert error_lines(result["stderr"], "lf-precompute") == [f"lf-precompute: error: {message}"], result
    assert results[-1]["heavy"] == [], "the lines ran in one interpreter: none imported torch or the encoders"
