"""Shared fixtures: configs composed like the command line does, and a tiny set of real data.

The session fixtures build, once per test run, what a user would have before training: raw
shards of real digits, a "pretrained" folder (a small random VAE and CLIP text encoder with the
real CLIP tokenizer, diffusers layout) and latent shards precomputed from them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.built_once import built_once
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures: a real S3 server)
from trainer.cli.hydra_app import compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NUM_DIGITS = 96


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
"""Variables an in-process run sets (Lightning writes the port it chose into ``MASTER_PORT``)."""


def run_variable(key: str) -> bool:
    """Whether ``key`` is a variable a run sets for itself (distributed rendezvous, Lightning's ``PL_*``)."""
    return key in DISTRIBUTED_ENV or key.startswith("PL_")


@pytest.fixture(autouse=True)
def no_leaked_run_environment():
    """Each test leaves the process environment's run variables as it found them.

    An in-process distributed or seeded run leaves ``MASTER_PORT`` (and Lightning's ``PL_*`` seed
    variables) in ``os.environ``; a command a later test starts would inherit them, as a user's shell
    never passes them, and its process group would try the port an earlier, still-open store holds.
    """
    before = {key: value for key, value in os.environ.items() if run_variable(key)}
    yield
    for key in [key for key in os.environ if run_variable(key)]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


INTEGRATION = Path(__file__).resolve().parent / "integration"
SORTING_MARKERS = ("slow", "dist")
"""An integration test carries one of these (``make test-fast`` leaves them out); a unit test carries none."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unsorted = [item.nodeid for item in items if not sorted_by_markers(item)]
    if unsorted:
        shown = "\n  ".join(unsorted[:20]) + (f"\n  ... and {len(unsorted) - 20} more" if len(unsorted) > 20 else "")
        raise pytest.UsageError(
            f"{len(unsorted)} test(s) under tests/integration/ without a slow or dist marker:\n  {shown}\n"
            "mark them (pytestmark = pytest.mark.slow), or move a test of a few seconds to tests/unit/"
        )
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def sorted_by_markers(item: pytest.Item) -> bool:
    """Whether ``item`` is where its markers say: an integration test is ``slow`` or ``dist``."""
    in_integration = INTEGRATION in Path(str(item.path)).resolve().parents
    return not in_integration or any(item.get_closest_marker(name) for name in SORTING_MARKERS)


def FirstDigits(count: int):
    """The first ``count`` training digits (a source for the shard writer)."""
    from data_pipelines.raw.sources.digits import DigitsSource

    return DigitsSource("train", limit=count)


@pytest.fixture(scope="session")
def raw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw shards of 96 real digits, 32 per shard."""
    from data_pipelines.raw.writer import write_raw_shards

    return built_once(
        tmp_path_factory, "raw_shards", lambda out: write_raw_shards(FirstDigits(NUM_DIGITS), out, samples_per_shard=32)
    )


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-layout folder with vae/, text_encoder/, tokenizer/ (small, random, seeded)."""

    from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

    def build(out: Path) -> None:
        save_tiny_text_encoder(out, max_length=8)
        save_tiny_vae(out)

    return built_once(tmp_path_factory, "pretrained", build)


@pytest.fixture(scope="session")
def latent_dir(tmp_path_factory: pytest.TempPathFactory, raw_shards: Path, pretrained_dir: Path) -> Path:
    """Latent shards of the 96 digits, made by the precompute command's code."""

    return built_once(tmp_path_factory, "latents", lambda out: precompute_digits(raw_shards, pretrained_dir, out))


@pytest.fixture(scope="session")
def sdxl_pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL-layout folder: vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ (small, random, seeded)."""

    from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders

    def build(out: Path) -> None:
        save_tiny_sdxl_text_encoders(out, max_length=8)
        save_tiny_vae(out)

    return built_once(tmp_path_factory, "sdxl_pretrained", build)


@pytest.fixture(scope="session")
def sdxl_latent_dir(tmp_path_factory: pytest.TempPathFactory, raw_shards: Path, sdxl_pretrained_dir: Path) -> Path:
    """SDXL latent shards of the 96 digits (both encoders' states, pooled embeddings, size/crop metadata)."""

    return built_once(
        tmp_path_factory, "sdxl_latents", lambda out: precompute_digits(raw_shards, sdxl_pretrained_dir, out)
    )


def save_tiny_vae(out: Path) -> None:
    """``out/vae``: the tiny autoencoder of ``train_autoencoder``'s config, seeded."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    vae = instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae)
    vae.save_pretrained(out / "vae", safe_serialization=True)


def precompute_digits(raw_shards: Path, pretrained: Path, out: Path, *extra: str) -> None:
    """Latent shards of the digits at 32 px into ``out``, by the precompute command's code, with ``extra`` overrides."""
    from trainer.cli.precompute import run_precompute

    overrides = [f"shards={raw_shards}", f"out_dir={out}", f"pretrained={pretrained}", "resolution=32"]
    run_precompute(compose_config("precompute", [*overrides, "batch_size=48", *extra]))


def tiny_train_overrides(latent_dir: Path, output_dir: Path, steps: int = 4) -> list[str]:
    """Overrides that make ``lf-train`` take a few seconds on the tiny data."""
    return [
        f"data.train_dir={latent_dir}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        f"output_dir={output_dir}",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "lr_scheduler.num_warmup_steps=1",
    ]


def autoencoder_overrides(raw_shards: Path, out: Path, checkpoints: str, steps: int) -> list[str]:
    """``lf-train-autoencoder`` on the digits at 32 px, batches of 4, a checkpoint every 2 steps (one kept)."""
    return [
        f"data.shards={raw_shards}", "data.resolution=32", "data.batch_size=4", "data.num_workers=0",
        f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "scaling_batches=1", f"output_dir={out}",
        f"callbacks.model_checkpoint.dirpath={checkpoints}", "callbacks.model_checkpoint.every_n_train_steps=2",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CLIP (transformers layout) trained on the digits in the test, for CLIP scores."""
    from tests.tiny_clip import train_tiny_clip

    return built_once(tmp_path_factory, "tiny_clip", train_tiny_clip)
