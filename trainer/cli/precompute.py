"""``lf-precompute``: encode raw shards into latent shards with a frozen VAE and text encoder.

Rerunning into the same out_dir reuses complete, up-to-date shards and encodes the rest; stale
shards (edited input, other encoders or transforms) are refused unless ``recompute_stale=true``.
Several processes: ``torchrun --nproc_per_node=N -m trainer.cli.precompute ...`` (Lightning's
``Trainer.predict`` runs DDP across them; rank r encodes input shards r, r + N, ... and writes its own).

Examples::

    lf-precompute shards=data/digits-train out_dir=data/latents pretrained=base/ resolution=32
    lf-precompute shards='data/shard-{000000..000099}.tar' out_dir=latents \\
        vae_path=sd15/vae text_encoder_path=sd15/text_encoder tokenizer_path=sd15/tokenizer
    lf-precompute shards=data/raw out_dir=data/latents-buckets pretrained=sd15/ buckets=sd512
    lf-precompute shards=data/raw out_dir=data/latents-inpaint pretrained=models/sd15-inpainting inpainting=true
    lf-precompute shards=data/raw out_dir=data/latents-xl pretrained=models/sdxl resolution=1024 buckets=...
    lf-precompute shards=data/raw out_dir=data/latents-aug pretrained=sd15/ flip=true crops_per_image=2

A ``pretrained`` folder with ``text_encoder_2/`` (an SDXL diffusers folder) gives SDXL's shards: both
encoders' penultimate states concatenated, the second's pooled embedding, and each sample's size and
crop for the time_ids (see ``data_pipelines.latents.format``).

Keys::

    shards           raw shards: a folder, a glob, a brace pattern, or a list; s3://bucket/prefix/ (any fsspec URL) too
    out_dir          the folder for the latent shards and their manifest (or s3://bucket/prefix)
    s3_endpoint_url  an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    pretrained       a diffusers folder with vae/, text_encoder/, tokenizer/ (or set the *_path keys); SDXL's
                     also has text_encoder_2/ and tokenizer_2/; s3://bucket/models/sd15 too (downloaded to cache_dir)
    cache_dir        local copies of model folders given by URL (default: $LF_CACHE_DIR, else
                     ~/.cache/latentforge/objects)
    resolution       square side of the images encoded (ignored with buckets)
    buckets          aspect-ratio buckets: sd512 | sd768 | tiny | explicit
    flip             also store each image's mirror image (training draws one variant per step)
    crops_per_image  also store N random crops (and their mirror images with flip), seeded by augment_seed
    recompute_stale  encode again shards made with other settings, instead of refusing them
    max_token_length 75 (default), 150 or 225: long captions in chunks of 75 tokens (kohya's recipe); recorded
                     in the manifest and the export, so lf-sample encodes prompts the same way
    clip_skip        1 (the last layer, default) or 2 (penultimate, A1111's numbering); SD 1.x/2.x only
    captions.*       caption variants per image (variants, from KEY.txt lines or KEY.json "captions") and
                     kohya-style tag tricks (shuffle_tags, keep_tokens, keep_tokens_separator, tag_dropout, prefix)
    keep_token_ids   also store each caption's token ids (KEY.token_ids.npy), for model.train_text_encoder=true

    lf-precompute shards=data/raw out_dir=data/latents-tags pretrained=sd15/ captions.variants=8 \\
        captions.shuffle_tags=true captions.keep_tokens=1 captions.tag_dropout=0.1 captions.prefix=sks
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_pipelines.latents.text_encoding import TextEncoding
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.transforms.captions import CaptionSettings
from lf_common import object_store
from lf_common.errors import ConfigError
from trainer.cli.command import lf_command

if TYPE_CHECKING:
    from data_pipelines.latents.shard_encoder import Transform


def run_precompute(cfg: DictConfig) -> dict[str, Any]:
    """Encode the configured shards; returns the written manifest as a dict."""
    pretrained = OmegaConf.select(cfg, "pretrained", default=None, throw_on_missing=False)
    if pretrained:  # s3://b/sd15/ -> the *_path keys are s3://b/sd15/vae, ...
        cfg.pretrained = object_store.display(pretrained)
    if cfg.get("inpainting") and (cfg.get("flip") or cfg.get("crops_per_image")):
        raise ConfigError(
            "inpainting=true with flip=true or crops_per_image>0: image variants have no inpainting masks; "
            "set flip=false crops_per_image=0"
        )
    shards = resolve_shards(cfg.shards)
    if cfg.get("buckets") and cfg.crop != "center":
        raise ConfigError(f"crop={cfg.crop!r} with buckets: bucketed images are center-cropped; set crop=center")
    text_encoder_2_path, tokenizer_2_path = second_text_encoder(cfg)
    captions = CaptionSettings(**(cfg.get("captions") or {}))  # a bad setting is refused before torch loads
    text_encoding = TextEncoding(int(cfg.get("max_token_length", 75)), int(cfg.get("clip_skip", 1)))
    text_encoding.check_sdxl(bool(text_encoder_2_path))
    # The checks above need no torch; the encoders do (imported here, so --help and config errors answer at once).
    from data_pipelines.latents.encoders import FrozenEncoders
    from data_pipelines.latents.precompute import precompute_latents
    from data_pipelines.latents.shard_encoder import LatentShardEncoder
    from data_pipelines.shards.corrupt_samples import SkipCounter
    from data_pipelines.transforms.augment import VariantSettings
    from data_pipelines.transforms.buckets import BucketResizeCrop
    from data_pipelines.transforms.images import ResizeCrop
    from data_pipelines.transforms.masks import MaskSettings
    from trainer.cli.quiet import quiet_known_noise

    quiet_known_noise()  # before precompute's Lightning Trainer logs its tip
    if cfg.get("buckets"):
        transform: Transform = BucketResizeCrop(instantiate(cfg.buckets), interpolation=cfg.interpolation)
    else:
        transform = ResizeCrop(cfg.resolution, crop=cfg.crop, interpolation=cfg.interpolation)
    encoders = FrozenEncoders.from_pretrained(
        cfg.vae_path,
        cfg.text_encoder_path,
        cfg.tokenizer_path,
        device=cfg.device,
        dtype=cfg.dtype,
        text_encoder_2_path=text_encoder_2_path,
        tokenizer_2_path=tokenizer_2_path,
        cache_dir=cfg.get("cache_dir"),
        text_encoding=text_encoding,
    )
    encoder = LatentShardEncoder(
        encoders,
        transform,
        batch_size=cfg.batch_size,
        skips=SkipCounter(cfg.max_bad_fraction, cfg.bad_fraction_min_samples),
        masks=MaskSettings(seed=cfg.get("mask_seed", 0)) if cfg.get("inpainting") else None,
        variants=VariantSettings(cfg.get("flip", False), cfg.get("crops_per_image", 0), cfg.get("augment_seed", 0)),
        captions=captions,
        token_ids=bool(cfg.get("keep_token_ids", False)),
    )
    manifest = precompute_latents(
        shards, cfg.out_dir, encoder, recompute_stale=cfg.recompute_stale, num_workers=cfg.num_workers
    )
    if manifest is None:  # a rank other than 0 under torchrun
        return {}
    skipped = sum(s.skipped for s in manifest.shards)
    latent = manifest.bucket_latent_shapes or manifest.latent_shape
    ids = f", token ids {manifest.token_ids_shape}" if manifest.token_ids else ""
    print(
        f"precompute: {manifest.num_samples} samples in {len(manifest.shards)} shards, {skipped} skipped; "
        f"latent {latent}, text {manifest.text_shape}{ids} -> {cfg.out_dir}"
    )
    return manifest.to_dict()


def second_text_encoder(cfg: DictConfig) -> tuple[str | None, str | None]:
    """SDXL's second text encoder and tokenizer folders: as configured, else ``pretrained``'s
    ``text_encoder_2/`` and ``tokenizer_2/`` when it has them (an SDXL diffusers folder), else none.

    Raises:
        ConfigError: one of the two is given without the other.
    """
    text_2, tokenizer_2 = cfg.get("text_encoder_2_path"), cfg.get("tokenizer_2_path")
    pretrained = OmegaConf.select(cfg, "pretrained", default=None, throw_on_missing=False)
    sdxl_folder = pretrained and object_store.is_folder(object_store.join(pretrained, "text_encoder_2"))
    if not text_2 and not tokenizer_2 and sdxl_folder:
        text_2, tokenizer_2 = f"{pretrained}/text_encoder_2", f"{pretrained}/tokenizer_2"
    if bool(text_2) != bool(tokenizer_2):
        raise ConfigError("text_encoder_2_path and tokenizer_2_path go together (SDXL's second encoder): set both")
    return text_2 or None, tokenizer_2 or None


@lf_command("precompute")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_precompute(cfg)


if __name__ == "__main__":
    main()
