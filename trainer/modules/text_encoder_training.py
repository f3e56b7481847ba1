"""Text encoders that train with the UNet, in one place for DreamBooth's recipes and any run on latent shards
(``lf-train model.train_text_encoder=true``).

What both share: the encoders train fully or through adapters (``text_encoder_lora``; SDXL's second encoder
``text_encoder_2_lora``) of the UNet adapters' kind, so one exported file holds them all; an SDXL UNet trains both
of its encoders, and the first encoder's last layer, which SDXL's penultimate reading never reaches, is frozen
(:func:`freeze_after_penultimate`); the checkpoint records the adapters' settings (``text_encoder_lora``,
``text_encoder_2_lora``) so the export rebuilds them, and the weights are the module's ``text_encoder.*`` and
``text_encoder_2.*``, the keys the export reads.

A run on latent shards takes its encoders from the shards' manifest (the folders that encoded them) or from
``model.pretrained``'s subfolders, refused when their tokenizers are not those the shards were made with (the
encoders may differ: a fine-tune continued from an export whose encoder trained) (:func:`shard_text_encoders`, built
by Hydra from ``model.text_encoders``); its step encodes the batch's
``token_ids`` (``lf-precompute keep_token_ids=true``) with them, as precompute encoded the captions
(:func:`~data_pipelines.latents.text_encoding.encode_token_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lf_common.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from data_pipelines.latents.text_encoding import TextEncoding
    from trainer.lora.adapters import LoraSettings

TOKEN_IDS = "token_ids"  # the latent batch's ids (B, n, L) of the first tokenizer
TOKEN_IDS_2 = "token_ids_2"  # SDXL: the second tokenizer's
NO_TOKEN_IDS = (
    "model.train_text_encoder=true encodes each caption's token ids in the step, but the {what} latent shards hold "
    "none: run lf-precompute keep_token_ids=true and train on its output, or set model.train_text_encoder=false"
)


class TextEncoderParts:
    """The text encoder(s) to train and their tokenizer(s): SD 1.x/2.x's one, SDXL's two. (A plain class, not a
    dataclass: Hydra would take a dataclass given to ``instantiate`` for a structured config.)

    Attributes:
        text_encoder, tokenizer: the (first) CLIP text model and its tokenizer.
        text_encoder_2, tokenizer_2: SDXL's second encoder (with its pooled projection) and its tokenizer.
    """

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
    ) -> None:
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """The encoders, first and (SDXL) second."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """The tokenizers, first and (SDXL) second."""
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]


def prepare_for_training(
    parts: TextEncoderParts,
    sdxl: bool,
    lora: LoraSettings | None,
    lora_2: LoraSettings | None,
    unet_lora: LoraSettings | None,
) -> None:
    """Make ``parts``' encoders train: all their weights, or only adapters added now; SDXL's idle last layer frozen.

    Args:
        parts: the encoders (SDXL: both).
        sdxl: whether the UNet is SDXL's (it needs both encoders; no other UNet takes the second).
        lora, lora_2: adapters for the first and the second encoder (``None``: the encoder trains fully).
        unet_lora: the UNet's adapters (their kind must be the encoders' adapters' kind).

    Raises:
        ConfigError: encoders that do not fit the UNet, adapters without their encoder, or two adapter kinds.
    """
    from trainer.lora.adapters import add_lora

    check_sdxl_text_encoders(sdxl, parts.text_encoder, parts.text_encoder_2, parts.tokenizer_2, lora, lora_2)
    check_one_adapter_kind(unet_lora, lora, lora_2)
    for encoder, settings, key in ((parts.text_encoder, lora, "model.text_encoder_lora"),
                                   (parts.text_encoder_2, lora_2, "model.text_encoder_2_lora")):  # fmt: skip
        if encoder is not None:
            encoder.train().requires_grad_(True)
            if settings is not None:
                add_lora(encoder, settings, key)
    if parts.text_encoder_2 is not None:  # SDXL reads the first encoder's penultimate state: its last layer is idle
        freeze_after_penultimate(parts.text_encoder)


def check_one_adapter_kind(
    unet_lora: LoraSettings | None, lora: LoraSettings | None, lora_2: LoraSettings | None
) -> None:
    """Refuse adapters of two kinds (LoRA and LoHa, ...): the exported file holds one kind.

    Raises:
        ConfigError: naming each key's kind.
    """
    adapters = {"model.lora": unet_lora, "model.text_encoder_lora": lora, "model.text_encoder_2_lora": lora_2}
    kinds = {f"{key}.kind={settings.kind}" for key, settings in adapters.items() if settings is not None}
    if len({kind.split("=")[1] for kind in kinds}) > 1:
        raise ConfigError(f"{', '.join(sorted(kinds))}: the exported file holds one kind of adapter; set one kind")


def freeze_after_penultimate(text_encoder: CLIPTextModel) -> None:
    """Freeze what follows the penultimate hidden state of SDXL's first encoder (its last layer, adapters
    included, and the final layer norm): nothing of it reaches the loss, and DDP wants every trainable
    parameter to get a gradient each step."""
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no text_model level
    model.encoder.layers[-1].requires_grad_(False)
    model.final_layer_norm.requires_grad_(False)


def freeze_unread_layers(text_encoder: CLIPTextModel, clip_skip: int) -> None:
    """Freeze the layers after the one ``clip_skip`` reads (``k`` reads ``hidden_states[-k]``: the last ``k - 1``
    layers, adapters included, idle; the final norm is read): nothing of them reaches the loss, and DDP wants every
    trainable parameter to get a gradient each step (SDXL's first encoder: :func:`freeze_after_penultimate`)."""
    if clip_skip > 1:
        layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers  # transformers 5: no text_model
        layers[len(layers) - (clip_skip - 1) :].requires_grad_(False)


def check_sdxl_text_encoders(
    sdxl: bool,
    text_encoder: CLIPTextModel | None,
    text_encoder_2: CLIPTextModelWithProjection | None,
    tokenizer_2: CLIPTokenizer | None,
    text_encoder_lora: LoraSettings | None,
    text_encoder_2_lora: LoraSettings | None,
) -> None:
    """Refuse trained text encoders that do not fit the UNet, with the recipe to use instead.

    Raises:
        ConfigError: an SDXL UNet with only the first encoder, a second encoder without the first, its
            tokenizer or an SDXL UNet.
    """
    if text_encoder_2 is not None and not sdxl:
        raise ConfigError("model.text_encoder_2 is SDXL's second encoder but the UNet is not SDXL's: drop it "
                          "(experiment=dreambooth_text_encoder trains SD 1.x/2.x's one encoder)")  # fmt: skip
    if text_encoder is not None and sdxl and text_encoder_2 is None:
        raise ConfigError("an SDXL UNet conditions on two text encoders: train both with "
                          "experiment=dreambooth_sdxl_text_encoder or experiment=dreambooth_lora_sdxl")  # fmt: skip
    if text_encoder_2 is not None and (text_encoder is None or tokenizer_2 is None):
        raise ConfigError("model.text_encoder_2 trains with model.text_encoder and needs model.tokenizer_2")
    if text_encoder_lora is not None and text_encoder is None:
        raise ConfigError("model.text_encoder_lora needs model.text_encoder, the encoder to add adapters to")
    if text_encoder_2_lora is not None and text_encoder_2 is None:
        raise ConfigError("model.text_encoder_2_lora needs model.text_encoder_2, the encoder to add adapters to")


def record_adapters(record: dict[str, Any], lora: LoraSettings | None, lora_2: LoraSettings | None) -> None:
    """Write the encoders' adapter settings into the checkpoint's ``record``: the export rebuilds the adapters
    before it loads the weights."""
    for key, settings in (("text_encoder_lora", lora), ("text_encoder_2_lora", lora_2)):
        if settings is not None:
            record[key] = settings.to_dict()


def encode_batch_token_ids(
    parts: TextEncoderParts,
    batch: Mapping[str, torch.Tensor],
    encoding: TextEncoding,
    uncond: Sequence[torch.Tensor | None] = (),
    drop: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The batch's ``token_ids`` ``(B, n, L)`` (SDXL: and ``token_ids_2``) through the training encoders: ``text``
    ``(B, T, D)`` (SDXL: ``D = D1 + D2``, and ``pooled`` ``(B, P)``), with gradients.

    Args:
        parts: the training encoders.
        batch: a latent batch holding the ids.
        encoding: the shards' recorded long prompts and ``clip_skip`` (so the step encodes as precompute did).
        uncond: the empty caption's ids ``(n, L)`` per tokenizer (the data module's ``uncond_token_ids``,
            ``uncond_token_ids_2``): a dropped sample's ids are replaced by them before encoding (kohya's caption
            dropout: the current encoder encodes the empty caption).
        drop: ``(B,)`` bool, which samples lose their caption; ``None``: none.
    """
    import torch

    from data_pipelines.latents.sdxl_text import encode_token_ids_sdxl
    from data_pipelines.latents.text_encoding import encode_token_ids

    ids = [batch[TOKEN_IDS], *([batch[TOKEN_IDS_2]] if parts.text_encoder_2 is not None else [])]
    if drop is not None:
        ids = [
            torch.where(drop.to(i.device)[:, None, None], empty.to(i), i)
            for i, empty in zip(ids, list(uncond)[: len(ids)], strict=True)
        ]
    if parts.text_encoder_2 is None:
        return {"text": encode_token_ids(parts.text_encoder, ids[0], encoding)}
    text, pooled = encode_token_ids_sdxl(parts.encoders, ids[0], ids[1], encoding)
    return {"text": text, "pooled": pooled}


def shard_text_encoders(
    train: bool,
    shards: str | None = None,
    datasets: Sequence[Any] | None = None,
    pretrained: str | None = None,
    online: str | None = None,
) -> TextEncoderParts | None:
    """The text encoder(s) a run trains (``model.text_encoders``; ``None`` when it trains none): those that encoded
    its latent shards, or that ``data=images_online`` encodes with.

    Args:
        train: ``model.train_text_encoder``; false: nothing is loaded.
        shards: the training shards' folder (``data.train_dir``).
        datasets: ``data=mixed``'s datasets (``{path, ...}`` each; they share their encoders): the first one's.
        pretrained: a diffusers folder to load them from (``model.pretrained``); ``None``: the folders the shards'
            manifest records.
        online: ``data=images_online``'s ``data.pretrained`` (no shards): its encoder and tokenizer.

    Raises:
        ConfigError: no data to take the encoders from, or tokenizers that are not the data's (the encoders may
            differ: the step encodes the stored ids with them; a difference is logged).
    """
    if not train:
        return None
    from data_pipelines.latents.format import EncoderInfo, LatentManifest
    from lf_common.object_store import join

    folder = shards or _first_path(datasets)
    if folder:
        manifest = LatentManifest.load(folder)
        key = manifest.shards[0].key() if manifest.shards else None  # the tokenizers' recorded fingerprints
        wanted = [("text_encoder", manifest.text_encoder, manifest.tokenizer_path, "tokenizer", key and key.tokenizer)]
        if manifest.text_encoder_2 is not None:
            second = (manifest.tokenizer_2_path, "tokenizer_2", key and key.tokenizer_2)
            wanted.append(("text_encoder_2", manifest.text_encoder_2, *second))
        return TextEncoderParts(*_load_checked(wanted, f"the latent shards in {folder}", pretrained))
    if online:
        from data_pipelines.latents.encoders import fingerprint_folder
        from lf_common.object_cache import model_folder

        encoder = join(online, "text_encoder")
        info = EncoderInfo(encoder, "CLIPTextModel", fingerprint_folder(model_folder(encoder)))
        wanted = [("text_encoder", info, join(online, "tokenizer"), "tokenizer", None)]
        return TextEncoderParts(*_load_checked(wanted, "data=images_online's captions", pretrained))
    raise ConfigError(
        "model.train_text_encoder=true takes the text encoders that made the training data: train on latent shards "
        "that lf-precompute keep_token_ids=true wrote (data.train_dir, or data=mixed's data.datasets) or with "
        "data=images_online"
    )


def _first_path(datasets: Sequence[Any] | None) -> str | None:
    if not datasets:
        return None
    first = datasets[0]
    return str(first.get("path") if isinstance(first, Mapping) else first)


def _load_checked(wanted: list[tuple[str, Any, str, str, str | None]], made: str, pretrained: str | None) -> list[Any]:
    """The encoders and tokenizers ``wanted`` names (``(name, EncoderInfo, tokenizer path, tokenizer name, tokenizer
    fingerprint or None)`` each), or
    ``pretrained``'s, each tokenizer checked against the one that made ``made``: the step encodes the stored ids with
    the encoder, so the ids must mean the same tokens; the encoder may differ (a fine-tune continued from an export
    whose encoder trained), which is logged in one line.

    Raises:
        ConfigError: a folder is missing, or a tokenizer's vocabulary, merges or ``model_max_length`` differ.
    """
    from pathlib import Path

    from hydra.utils import get_class

    from data_pipelines.latents.encoders import fingerprint_folder
    from lf_common.object_cache import model_folder
    from lf_common.object_store import join

    loaded: list[Any] = [None, None, None, None]
    for number, (name, info, recorded_tokenizer, tokenizer_name, fingerprint) in enumerate(wanted):
        encoder_path = join(pretrained, name) if pretrained else info.path
        tokenizer_path = join(pretrained, tokenizer_name) if pretrained else recorded_tokenizer
        encoder_dir, tokenizer_dir = Path(model_folder(encoder_path)), Path(model_folder(tokenizer_path))
        for path, local in ((encoder_path, encoder_dir), (tokenizer_path, tokenizer_dir)):
            if not local.is_dir():
                raise ConfigError(
                    f"{path}: the folder is missing; model.train_text_encoder=true loads it (set "
                    "model.text_encoders.pretrained to a diffusers folder with the data's encoders)"
                )
        tokenizer = get_class("transformers.CLIPTokenizer").from_pretrained(tokenizer_dir, local_files_only=True)
        if tokenizer_path != recorded_tokenizer:
            same_folder = fingerprint is not None and fingerprint_folder(tokenizer_dir) == fingerprint
            if not same_folder:
                _check_same_tokens(tokenizer, tokenizer_path, recorded_tokenizer, made)
        if fingerprint_folder(encoder_dir) != info.fingerprint:
            log.info(
                "%s: not the %s that encoded %s (its fingerprint differs); it trains on from its own weights, the "
                "step encodes the stored token ids with it",
                encoder_path,
                name,
                made,
            )
        loaded[2 * number] = get_class(f"transformers.{info.class_name}").from_pretrained(
            encoder_dir, local_files_only=True
        )
        loaded[2 * number + 1] = tokenizer
    return loaded


def tokens_of(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """What gives a token id its meaning and a caption its ids: the vocabulary, the BPE merges, ``model_max_length``
    and the padding token (not the files' layout: an export re-saves the tokenizer)."""
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
    return {
        "vocabulary": tokenizer.get_vocab(),
        "merges": merges,
        "model_max_length": tokenizer.model_max_length,
        "pad_token": str(tokenizer.pad_token),
    }


def _check_same_tokens(tokenizer: CLIPTokenizer, path: str, recorded: str, made: str) -> None:
    """Refuse ``tokenizer`` (from ``path``) unless it tokenizes as the tokenizer at ``recorded`` did for ``made``."""
    from pathlib import Path

    from transformers import CLIPTokenizer

    from lf_common.object_cache import model_folder

    fix = f"train with the tokenizer at {recorded} (model.text_encoders.pretrained), or encode the data with this one"
    recorded_dir = Path(model_folder(recorded))
    if not recorded_dir.is_dir():
        raise ConfigError(f"{recorded}: the tokenizer that made {made} is missing, so {path} cannot be checked; {fix}")
    theirs, ours = tokens_of(CLIPTokenizer.from_pretrained(recorded_dir, local_files_only=True)), tokens_of(tokenizer)
    differ = [what for what in ours if ours[what] != theirs[what]]
    if differ:
        raise ConfigError(f"{path}: not the tokenizer that made {made} (its {', '.join(differ)} differ); {fix}")
