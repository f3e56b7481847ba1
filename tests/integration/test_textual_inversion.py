"""Textual inversion end to end on the tiny models: only the new rows change, the files load in diffusers
and in lf-sample to the conditioning training used, SD 1.x and SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from lf_common.errors import DataError
from tests.conftest import compose_config, tiny_train_overrides
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.hydra_app import optimizer_factories
from trainer.cli.train import run_train
from trainer.sampling.loading import load_embeddings
from trainer.sampling.sampler import Sampler

pytestmark = pytest.mark.slow
TOKEN = "<d7>"


def ti_overrides(
    base: Path, latents: Path, run: Path, experiment: str = "textual_inversion", steps: int = 3
) -> list[str]:
    """A short textual-inversion run: token <d7> of two vectors from "digit", one template, lr 0.1."""
    return [
        *tiny_train_overrides(latents, run, steps), f"experiment={experiment}", f"model.pretrained={base}",
        f"model.textual_inversion.tokens=['{TOKEN}']", "model.textual_inversion.init_word=digit",
        "model.textual_inversion.num_vectors=2", "model.textual_inversion.templates=['a handwritten {}']",
        "optim.lr=0.1", "data.batch_size=8", f"callbacks.model_checkpoint.every_n_train_steps={steps}",
    ]  # fmt: skip


def initial_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The module's weights before training (built from the same config)."""
    cfg = compose_config("train", overrides)
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    return {key: value.clone() for key, value in module.state_dict().items()}


def check_only_rows_changed(overrides: list[str], run: Path, encoders: int) -> dict:
    before = initial_state(overrides)
    run_train(compose_config("train", overrides))
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    after, record = checkpoint["state_dict"], checkpoint["latentforge"]["textual_inversion"]
    assert set(after) == set(before)
    rows = set(record["row_keys"])
    assert len(rows) == encoders and all(key.endswith("token_embedding.rows") for key in rows)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == rows  # exact: every other weight of the UNet and the text encoders is bit-identical
    return record


def test_sd_textual_inversion_trains_only_the_new_rows_and_exports(base_model, latent_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.cli.export import run_export
    from trainer.cli.import_model import run_import
    from trainer.cli.sample import run_sample

    run = tmp_path / "run"
    overrides = ti_overrides(base_model, latent_dir, run)
    record = check_only_rows_changed(overrides, run, encoders=1)
    assert record["vector_tokens"] == {TOKEN: [TOKEN, f"{TOKEN}_1"]}
    ui_file, diffusers_file = (
        run / "embeddings" / "d7.safetensors",
        run / "embeddings" / "d7" / "learned_embeds.safetensors",
    )
    ui = load_file(ui_file)
    assert list(ui) == ["emb_params"] and ui["emb_params"].shape == (2, 32)  # one key: AUTOMATIC1111 asserts it
    assert list(load_file(diffusers_file)) == [TOKEN]

    # diffusers' own loader on the base pipeline gives the conditioning lf-sample gives with the file
    pipe = StableDiffusionPipeline.from_pretrained(base_model, local_files_only=True)
    pipe.load_textual_inversion(str(ui_file), token=TOKEN)
    prompt = f"a handwritten {TOKEN}"
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    sampler = Sampler.load(base_model, device="cpu")
    assert load_embeddings([diffusers_file], [sampler.tokenizer], [sampler.text_encoder]) == [TOKEN]
    ours = sampler.encode_prompts([prompt])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # ... and what training conditioned on: the module's own encoding of the template with the trained rows
    cfg = compose_config("train", [*overrides, f"model.textual_inversion.embeddings_from={ui_file}"])
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    with torch.no_grad():
        trained = module.conditioning(["unused caption"])["text"]
    torch.testing.assert_close(trained, ours, rtol=0, atol=1e-6)

    # lf-export writes the embeddings beside the base pipeline; lf-sample takes them from the export folder, the
    # checkpoint or embeddings=FILE alike (the same image); lf-import names what the file is
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    assert load_file(export / "embeddings" / "d7.safetensors")["emb_params"].shape == (2, 32)
    sample = ["num_images_per_prompt=1", "steps=2", f'prompts=["{prompt}"]', "grid=false"]
    images = {}
    for name, extra in (
        ("export", [f"model_dir={export}"]),
        ("checkpoint", [f"model_dir={run / 'checkpoints' / 'last.ckpt'}"]),
        ("file", [f"model_dir={base_model}", f"embeddings={run / 'embeddings' / 'd7.safetensors'}"]),
    ):
        result = run_sample(compose_config("sample", [*sample, *extra, f"out_dir={tmp_path / name}"]))
        images[name] = torch.tensor(list(result["images"][0].getdata()))
    assert torch.equal(images["export"], images["file"]) and torch.equal(images["checkpoint"], images["file"])
    with pytest.raises(DataError, match=r"a textual-inversion embedding: use lf-sample embeddings="):
        run_import(compose_config("import", [f"pretrained={run / 'embeddings' / 'd7.safetensors'}",
                                             f"out_dir={tmp_path / 'imported'}"]))  # fmt: skip


def test_sdxl_textual_inversion_trains_rows_of_both_encoders(sdxl_base_model, sdxl_latent_dir, tmp_path):
    run = tmp_path / "run"
    overrides = ti_overrides(sdxl_base_model, sdxl_latent_dir, run, experiment="textual_inversion_sdxl", steps=2)
    check_only_rows_changed(overrides, run, encoders=2)
    ui = load_file(run / "embeddings" / "d7.safetensors")
    assert sorted(ui) == ["clip_g", "clip_l"] and ui["clip_l"].shape[0] == ui["clip_g"].shape[0] == 2
    sampler = Sampler.load(sdxl_base_model, device="cpu")
    text = sampler.prompt_encoder
    load_embeddings([run / "embeddings" / "d7.safetensors"], list(text.tokenizers), list(text.text_encoders))
    cfg = compose_config("train", [*overrides, f"model.textual_inversion.embeddings_from={run / 'embeddings' / 'd7'}"])
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    with torch.no_grad():
        trained = module.conditioning(["unused caption"])
    ours, pooled = sampler.encode_prompts_and_pooled([f"a handwritten {TOKEN}"])
    torch.testing.assert_close(trained["text"], ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(trained["pooled"], pooled, rtol=0, atol=1e-6)


def test_a_token_trained_on_sevens_reads_as_a_seven(demo, tmp_path):
    """Textual inversion learns (Gal et al. 2022): on the demo's text-conditional model, a new token <d7> from
    "digit", trained on 64 sevens for 40 steps, makes "a handwritten <d7>" read as a seven by the digits
    classifier in at least 60% of 20 samples, where "a handwritten digit" (its init word) gives at most 30%.
    Measured here: 20 of 20 sevens against 0 of 20; about 60 s on 2 busy cores, beyond the shared demo fixture."""
    import numpy as np

    from data_pipelines.raw.sources.digits import DigitsSource
    from data_pipelines.raw.writer import write_raw_shards
    from trainer.cli.precompute import run_precompute
    from trainer.cli.sample import run_sample
    from trainer.evaluation.digits_accuracy import DigitsClassifier

    out, _ = demo
    sevens = [item for item in DigitsSource("train") if item.meta["label"] == 7][:64]
    write_raw_shards(iter(sevens), tmp_path / "raw", samples_per_shard=64)
    run_precompute(compose_config("precompute", [f"shards={tmp_path / 'raw'}", f"out_dir={tmp_path / 'latents'}",
                                                 f"pretrained={out / 'base'}", "resolution=32"]))  # fmt: skip
    run = tmp_path / "run"
    overrides = [*tiny_train_overrides(tmp_path / "latents", run, steps=40), "experiment=textual_inversion",
                 f"model.pretrained={out / 'export'}", f"model.textual_inversion.tokens=['{TOKEN}']",
                 "model.textual_inversion.init_word=digit", "model.textual_inversion.templates=['a handwritten {}']",
                 "optim.lr=0.05", "data.batch_size=32",
                 "callbacks.model_checkpoint.every_n_train_steps=40"]  # fmt: skip
    run_train(compose_config("train", overrides))
    classifier, rates = DigitsClassifier(), {}
    for name, prompt, extra in (
        ("token", f"a handwritten {TOKEN}", [f"embeddings={run / 'embeddings' / 'd7.safetensors'}"]),
        ("init_word", "a handwritten digit", []),
    ):
        sample = [f"model_dir={out / 'export'}", f'prompts=["{prompt}"]', "num_images_per_prompt=20", "steps=15",
                  "guidance_scale=3.0", "grid=false", f"out_dir={tmp_path / name}", *extra]  # fmt: skip
        images = run_sample(compose_config("sample", sample))["images"]
        rates[name] = float(np.mean(classifier.predict(images) == 7))
    assert rates["token"] >= 0.6 and rates["init_word"] <= 0.3, rates


def test_pivotal_tuning_trains_lora_and_rows_then_only_lora(base_model, latent_dir, tmp_path):
    """experiment=pivotal_lora: the adapters and the rows both change; after train_fraction (2 of 4 steps) the rows
    stay bit-identical while the adapters go on; the export bundles the embeddings in kohya's LoRA file, which
    lf-sample reloads to the same image as the LoRA and embedding files apart."""
    from trainer.cli.export import run_export

    run = tmp_path / "run"
    overrides = [*ti_overrides(base_model, latent_dir, run, experiment="pivotal_lora", steps=4),
                 "callbacks.model_checkpoint.every_n_train_steps=2", "model.lora.rank=2"]  # fmt: skip
    before = initial_state(overrides)
    run_train(compose_config("train", overrides))
    middle = load_checkpoint(run / "checkpoints" / "step-0000002.ckpt")["state_dict"]
    end = load_checkpoint(run / "checkpoints" / "last.ckpt")
    rows = end["latentforge"]["textual_inversion"]["row_keys"]
    adapters = {key for key in before if "lora_" in key}
    changed = {key for key in before if not torch.equal(before[key], end["state_dict"][key])}
    assert changed == adapters | set(rows)  # nothing else
    assert all(torch.equal(middle[key], end["state_dict"][key]) for key in rows)  # frozen after step 2
    assert any(not torch.equal(middle[key], end["state_dict"][key]) for key in adapters)  # the adapters went on
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    bundled = load_file(export / "lora" / "lora_kohya.safetensors")
    assert torch.equal(bundled[f"bundle_emb.{TOKEN}.string_to_param.*"], end["state_dict"][rows[0]])
    assert any(key.startswith("lora_unet_") for key in bundled)
    assert (export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (export / "embeddings" / "d7" / "learned_embeds.safetensors").is_file()
    # lf-sample: the bundled kohya file alone gives the image of diffusers' LoRA file plus the embedding file
    from trainer.cli.sample import run_sample

    images = []
    for name, extra in (
        ("bundle", [f"lora={export / 'lora' / 'lora_kohya.safetensors'}"]),
        ("apart", [f"lora={export / 'lora'}", f"embeddings={export / 'embeddings' / 'd7.safetensors'}"]),
    ):
        sample = [f"model_dir={base_model}", f'prompts=["a handwritten {TOKEN}"]', "num_images_per_prompt=1",
                  "steps=2", "grid=false", f"out_dir={tmp_path / name}", *extra]  # fmt: skip
        images.append(torch.tensor(list(run_sample(compose_config("sample", sample))["images"][0].getdata())))
    assert torch.equal(images[0], images[1])


def sampled_image(tmp_path: Path, name: str, prompt: str, extra: list[str]) -> torch.Tensor:
    """lf-sample's one image ``(H*W, 3)`` uint8 of ``prompt`` (2 steps, seed 0)."""
    from trainer.cli.sample import run_sample

    sample = ["num_images_per_prompt=1", "steps=2", f'prompts=["{prompt}"]', "grid=false", "seed=0",
              f"out_dir={tmp_path / name}", *extra]  # fmt: skip
    return torch.tensor(list(run_sample(compose_config("sample", sample))["images"][0].getdata()))


def check_pivotal_run(overrides: list[str], run: Path) -> tuple[dict, list[str]]:
    """Train ``overrides`` (4 steps, rows frozen after 2, a checkpoint every 2): the rows, the UNet's adapters and the
    encoders' adapters all change and nothing else; the rows stay from step 2 on while both kinds of adapter go on.

    Returns:
        The last checkpoint and its rows' state keys.
    """
    before = initial_state(overrides)
    run_train(compose_config("train", overrides))
    middle = load_checkpoint(run / "checkpoints" / "step-0000002.ckpt")["state_dict"]
    end = load_checkpoint(run / "checkpoints" / "last.ckpt")
    rows = end["latentforge"]["textual_inversion"]["row_keys"]
    unet = {key for key in before if "lora_" in key and key.startswith("unet.")}
    encoders = {key for key in before if "lora_" in key and key.startswith("text_encoders.")}
    assert unet and encoders
    changed = {key for key in before if not torch.equal(before[key], end["state_dict"][key])}
    assert set(rows) <= changed and changed <= unet | encoders | set(rows)  # nothing but rows and adapters
    assert any(key in changed for key in unet) and any(key in changed for key in encoders)
    assert all(torch.equal(middle[key], end["state_dict"][key]) for key in rows)  # frozen after step 2: exact
    for adapters in (unet, encoders):  # ... while the adapters went on
        assert any(not torch.equal(middle[key], end["state_dict"][key]) for key in adapters)
    return end, rows


def check_exported_encoder_adapters(checkpoint: dict, diffusers_file: Path) -> None:
    """diffusers' LoRA file holds each encoder's trained adapters (``text_encoders.N.<module>.lora_A.default.weight``
    of the checkpoint as ``text_encoder[_2].text_model.<module>.lora_A.weight``), bit-equal."""
    exported = load_file(diffusers_file)
    held_at = checkpoint["latentforge"]["text_encoder_keys"]
    for part, prefix in held_at.items():
        state = checkpoint["state_dict"]
        trained = {  # transformers 5's CLIPTextModel has no text_model level, its CLIPTextModelWithProjection has
            key.removeprefix(prefix).removeprefix("text_model.").replace(".default.", "."): value
            for key, value in state.items()
            if key.startswith(prefix) and "lora_" in key
        }
        ours = {key.removeprefix(f"{part}.text_model."): v for key, v in exported.items() if key.startswith(f"{part}.")}
        assert trained and set(ours) == set(trained)
        assert all(torch.equal(ours[key], trained[key]) for key in trained)


def test_pivotal_tuning_with_text_encoder_lora_exports_one_file_that_samples_as_the_checkpoint(
    base_model, latent_dir, tmp_path
):
    """experiment=pivotal_lora_text_encoder: rows, UNet adapters and CLIP adapters train; the export's kohya file
    holds lora_unet_*, lora_te_* and bundle_emb.*, and lf-sample lora=FILE on the base gives the image of sampling
    the run's checkpoint. Within 1 of 255 per channel, not bit-equal: the checkpoint's adapters are merged into the
    weights (W + s B A), the file's run beside them (W x + s B A x), rounding differently in float32."""
    from trainer.cli.export import run_export

    run = tmp_path / "run"
    overrides = [*ti_overrides(base_model, latent_dir, run, experiment="pivotal_lora_text_encoder", steps=4),
                 "callbacks.model_checkpoint.every_n_train_steps=2", "model.lora.rank=2"]  # fmt: skip
    end, rows = check_pivotal_run(overrides, run)
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    bundled = load_file(export / "lora" / "lora_kohya.safetensors")
    assert torch.equal(bundled[f"bundle_emb.{TOKEN}.string_to_param.*"], end["state_dict"][rows[0]])
    assert any(key.startswith("lora_unet_") for key in bundled) and any(key.startswith("lora_te_") for key in bundled)
    check_exported_encoder_adapters(end, export / "lora" / "pytorch_lora_weights.safetensors")
    prompt = f"a handwritten {TOKEN}"
    bundle_file = export / "lora" / "lora_kohya.safetensors"
    bundle = sampled_image(tmp_path, "bundle", prompt, [f"model_dir={base_model}", f"lora={bundle_file}"])
    checkpoint = sampled_image(tmp_path, "checkpoint", prompt, [f"model_dir={run / 'checkpoints' / 'last.ckpt'}"])
    base = sampled_image(tmp_path, "base", prompt.replace(TOKEN, "digit"), [f"model_dir={base_model}"])
    assert (bundle.int() - checkpoint.int()).abs().max() <= 1
    assert not torch.equal(bundle, base)  # the adapters and the token changed the image


def test_sdxl_pivotal_tuning_with_both_encoders_adapters_reloads_in_lf_sample_and_diffusers(
    sdxl_base_model, sdxl_latent_dir, tmp_path
):
    """experiment=pivotal_lora_sdxl_text_encoder on the tiny SDXL model: rows in both encoders, the UNet's and both
    encoders' adapters train, the rows stop after 2 of 4 steps. The kohya file bundles bundle_emb.<token>.clip_l and
    .clip_g (the keys AUTOMATIC1111 and ComfyUI read) with lora_unet_input_blocks_*, lora_te1_*, lora_te2_*;
    lf-sample lora=FILE on the base samples as the run's checkpoint (within 1 of 255: merged vs. unmerged adapters,
    see the SD test). diffusers' load_lora_weights (lora/) and load_textual_inversion (embeddings/d7/, one file per
    encoder) give the conditioning and the UNet output of lf-sample's loading of the bundle, bit-equal."""
    from diffusers import StableDiffusionXLPipeline

    from trainer.cli.export import run_export
    from trainer.sampling.loading import load_lora_file

    run = tmp_path / "run"
    experiment = "pivotal_lora_sdxl_text_encoder"
    overrides = [*ti_overrides(sdxl_base_model, sdxl_latent_dir, run, experiment=experiment, steps=4),
                 "callbacks.model_checkpoint.every_n_train_steps=2", "model.lora.rank=2"]  # fmt: skip
    end, rows = check_pivotal_run(overrides, run)
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    check_exported_encoder_adapters(end, export / "lora" / "pytorch_lora_weights.safetensors")
    bundle_file = export / "lora" / "lora_kohya.safetensors"
    bundled = load_file(bundle_file)
    for name, key in zip(("clip_l", "clip_g"), rows, strict=True):
        assert torch.equal(bundled[f"bundle_emb.{TOKEN}.{name}"], end["state_dict"][key])
    for prefix in ("lora_unet_input_blocks_", "lora_te1_", "lora_te2_"):
        assert any(key.startswith(prefix) for key in bundled), prefix

    prompt = f"a handwritten {TOKEN}"
    bundle = sampled_image(tmp_path, "bundle", prompt, [f"model_dir={sdxl_base_model}", f"lora={bundle_file}"])
    checkpoint = sampled_image(tmp_path, "checkpoint", prompt, [f"model_dir={run / 'checkpoints' / 'last.ckpt'}"])
    assert (bundle.int() - checkpoint.int()).abs().max() <= 1

    sampler = Sampler.load(sdxl_base_model, device="cpu")
    text = sampler.prompt_encoder
    assert load_lora_file(bundle_file, sampler.unet, list(text.tokenizers), list(text.text_encoders)) == [TOKEN]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base_model, local_files_only=True)
    pipe.load_lora_weights(str(export / "lora"))
    for file, encoder, tokenizer in (
        ("learned_embeds.safetensors", pipe.text_encoder, pipe.tokenizer),
        ("learned_embeds_2.safetensors", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        path = str(export / "embeddings" / "d7" / file)
        pipe.load_textual_inversion(path, token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)  # fmt: skip
        ours_text, ours_pooled = sampler.encode_prompts_and_pooled([prompt])
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        theirs_unet = pipe.unet(x, t, text, added_cond_kwargs=added).sample
        ours_unet = sampler.unet(x, t, text, added_cond_kwargs=added).sample
    assert torch.equal(ours_text, text) and torch.equal(ours_pooled, pooled) and torch.equal(ours_unet, theirs_unet)


def test_pivotal_tuning_with_loha_bundles_the_embeddings_in_the_lycoris_file(base_model, latent_dir, tmp_path):
    """experiment=pivotal_lora with +model.lora.kind=loha: the export's LyCORIS file (lora_lycoris.safetensors) holds
    bundle_emb.<token>.* beside the LoHa weights, as the kohya LoRA file does (AUTOMATIC1111's Lora extension reads
    bundle_emb from any network file, LyCORIS kinds included), and lf-sample lora=FILE on the base adds both: the
    image of sampling the run's checkpoint (within 1 of 255: merged vs. unmerged adapters)."""
    from trainer.cli.export import run_export
    from trainer.interop.lora_formats import LYCORIS_FILE

    run = tmp_path / "run"
    overrides = [*ti_overrides(base_model, latent_dir, run, experiment="pivotal_lora", steps=2),
                 "+model.lora.kind=loha", "model.lora.rank=2"]  # fmt: skip
    run_train(compose_config("train", overrides))
    end = load_checkpoint(run / "checkpoints" / "last.ckpt")
    (row,) = end["latentforge"]["textual_inversion"]["row_keys"]
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    bundled = load_file(export / "lora" / LYCORIS_FILE)
    assert torch.equal(bundled[f"bundle_emb.{TOKEN}.string_to_param.*"], end["state_dict"][row])
    assert any(key.startswith("lora_unet_") and ".hada_w1_a" in key for key in bundled)
    prompt = f"a handwritten {TOKEN}"
    bundle = sampled_image(
        tmp_path, "bundle", prompt, [f"model_dir={base_model}", f"lora={export / 'lora' / LYCORIS_FILE}"]
    )
    checkpoint = sampled_image(tmp_path, "checkpoint", prompt, [f"model_dir={run / 'checkpoints' / 'last.ckpt'}"])
    assert (bundle.int() - checkpoint.int()).abs().max() <= 1
