"""The key layouts single files come in: ONE table, each row mapped exactly to the canonical layout or refused by name.

The canonical layout is what :mod:`trainer.interop.sd_single_file` maps to diffusers: the UNet
under ``model.diffusion_model.*``, the VAE under ``first_stage_model.*``, the text encoder under
``cond_stage_model.transformer.text_model.*`` (CLIP) or ``cond_stage_model.model.*`` (OpenCLIP), or
SDXL's two under ``conditioner.embedders.0.transformer.text_model.*`` and ``conditioner.embedders.1.model.*``,
weights only. Every row of :data:`LAYOUTS` whose test matches a file is applied in order: a refused
row stops the import with one line naming the layout and the fix; a mapped row rewrites keys and
leaves a note. What is left after the table must map key for key (else the strict check lists
every key that did not map).

Pickled files (``.ckpt``) come through the pickle policy of :mod:`trainer.interop.safe_load`
(refused unless ``allow_pickle``, then ``torch.load(weights_only=True)``), which takes ldm's
``state_dict`` entry; the table notes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainer.interop.ldm_ema import ema_only_unet, ema_weight_keys, split_ema
from trainer.interop.safe_load import WeightFile
from trainer.interop.sd_single_file import (
    NON_WEIGHT_KEYS,
    OPEN_CLIP_PREFIX,
    PREDICTION_MARKERS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMapError,
)
from trainer.interop.sd_text_encoder_keys import OPEN_CLIP_UNUSED

CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model. in the canonical layout
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder: OpenCLIP bigG in slot 0
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora_linear_layer.")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Normalized:
    """A file in the canonical layout, with what the table did to it.

    Attributes:
        state: the weights, canonical keys.
        metadata: the safetensors header.
        layouts: the names of the rows that matched, in order.
        notes: one line per mapped row (what was mapped, ignored or chosen).
        markers: the prediction-type markers the file carries (:data:`PREDICTION_MARKERS`: ``v_pred``, ``ztsnr``).
        set_aside: weights the canonical layout has no place for but a single file of this model holds
            (SD 2.x: OpenCLIP's last block, ``text_projection``, ``logit_scale``), original keys: kept beside
            the import and written back by the single-file export.
    """

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layouts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    set_aside: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """One row of the table.

    Attributes:
        name: printed, stored with the import, and named in a refusal.
        matches: whether a file (its weights and how it was read) has this layout.
        apply: ``(state, ema) -> (state, note)``: the file mapped toward the canonical layout; ``None``
            for a refused layout.
        fix: for a refused layout, what to do instead.
        keeps: what ``apply`` drops is set aside (:attr:`Normalized.set_aside`), not lost.
    """

    name: str
    matches: Callable[[WeightFile], bool]
    apply: Callable[[dict[str, torch.Tensor], bool], tuple[dict[str, torch.Tensor], str]] | None = None
    fix: str = ""
    keeps: bool = False


def _any(prefixes: tuple[str, ...], contains: tuple[str, ...] = ()) -> Callable[[WeightFile], bool]:
    """A test: some key starts with one of ``prefixes`` (and, if given, contains one of ``contains``)."""

    def test(file: WeightFile) -> bool:
        return any(k.startswith(prefixes) and (not contains or any(c in k for c in contains)) for k in file.state)

    return test


def _contains(*parts: str) -> Callable[[WeightFile], bool]:
    return lambda file: any(part in key for key in file.state for part in parts)


def _has_unet(file: WeightFile) -> bool:
    return any(key.startswith(UNET_PREFIX) for key in file.state)


def _incomplete(file: WeightFile) -> bool:
    """A UNet (or its EMA copy) without a VAE or without a text encoder."""
    unet = _has_unet(file) or bool(ema_weight_keys(file.state))
    vae = any(key.startswith(VAE_PREFIX) for key in file.state)
    text = any(key.startswith(TEXT_PREFIXES) for key in file.state)
    return unet and not (vae and text)


def _diffusers_part(file: WeightFile) -> bool:
    """A diffusers model file (``diffusion_pytorch_model.safetensors``, ``model.safetensors``): bare diffusers names."""
    bare = ("conv_in.", "time_embedding.", "down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")
    return not _has_unet(file) and any(key.startswith(bare) for key in file.state)


def _ldm_vae_alone(file: WeightFile) -> bool:
    return not _has_unet(file) and {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= file.state.keys()


def _textual_inversion(file: WeightFile) -> bool:
    """AUTOMATIC1111/ComfyUI (``emb_params``; SDXL's ``clip_l``/``clip_g``; a ``.pt``'s ``string_to_param``) or
    diffusers (one ``(N, D)`` tensor named by its token) embeddings (:mod:`trainer.interop.embedding_files`)."""
    keys = file.state.keys()
    if keys and (keys <= {"emb_params", "clip_l", "clip_g"} or any(k.startswith("string_to_param.") for k in keys)):
        return True
    if len(keys) != 1:
        return False
    ((key, value),) = file.state.items()
    return "." not in key and isinstance(value, torch.Tensor) and value.ndim in (1, 2)


def _ema_beside_unet(file: WeightFile) -> bool:
    return bool(ema_weight_keys(file.state)) and _has_unet(file)


def _ema_alone(file: WeightFile) -> bool:
    return bool(ema_weight_keys(file.state)) and not _has_unet(file)


def _take_ema(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    rest, copy = split_ema(state, "the file")
    if ema:
        return rest | copy, f"the UNet taken from its EMA copy ({len(copy)} tensors); ema=false takes the raw one"
    return rest, f"the raw UNet taken; its EMA copy ({len(copy)} tensors) ignored (ema=true takes it)"


def _only_ema(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    out = ema_only_unet(state, "the file")
    return out, "the UNet is the file's EMA copy (model_ema.*, no raw UNet): names restored with their dots"


def _clip_without_text_model(file: WeightFile) -> bool:
    return any(key.startswith(CLIP_PREFIX) and not key.startswith(TEXT_PREFIX) for key in file.state)


def _add_text_model(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    bare = [key for key in state if key.startswith(CLIP_PREFIX) and not key.startswith(TEXT_PREFIX)]
    out = {TEXT_PREFIX + key[len(CLIP_PREFIX) :] if key in bare else key: tensor for key, tensor in state.items()}
    return out, "CLIP text encoder stored without 'text_model.' (kohya under transformers 5): prefix added"


def _open_clip_full_tower(file: WeightFile) -> bool:
    return any(OPEN_CLIP_PREFIX + name in file.state for name in OPEN_CLIP_UNUSED)


def _drop_open_clip_unused(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """OpenCLIP's whole text tower (SD 2.x's own files): SD 2.x takes the penultimate layer, so the last
    block is unused, as are the contrastive projection and temperature."""
    blocks = {int(key.split(".")[4]) for key in state if key.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")}
    last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{max(blocks)}." if blocks else None
    unused = {OPEN_CLIP_PREFIX + name for name in OPEN_CLIP_UNUSED}
    dropped = [key for key in state if key in unused or (last and key.startswith(last))]
    out = {key: tensor for key, tensor in state.items() if key not in dropped}
    return out, (
        f"its last block (resblocks.{max(blocks)}, unused by SD 2.x), text_projection and logit_scale set aside "
        "(kept beside the import; a single-file export writes them back)"
    )


def _has_markers(file: WeightFile) -> bool:
    return any(key in file.state for key in PREDICTION_MARKERS)


def _drop_markers(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    found = [key for key in PREDICTION_MARKERS if key in state]
    out = {key: tensor for key, tensor in state.items() if key not in found}
    return out, f"top-level {found} (ComfyUI's prediction-type markers): read as the prediction type"


def _has_extras(file: WeightFile) -> bool:
    return any(key in NON_WEIGHT_KEYS or key.endswith(".position_ids") for key in file.state)


def _drop_extras(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    extras = sorted(key for key in state if key in NON_WEIGHT_KEYS or key.endswith(".position_ids"))
    out = {key: tensor for key, tensor in state.items() if key not in extras}
    return out, f"ignored {len(extras)} non-weight entries (schedule buffers, counters, position ids): {extras}"


def _half(file: WeightFile) -> bool:
    return any(tensor.dtype in HALF_DTYPES for tensor in file.state.values())


def _note_half(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.dtype in HALF_DTYPES})
    return state, f"weights stored as {'/'.join(dtypes)}; cast to the import's dtype"


def _nested(file: WeightFile) -> bool:
    return file.nesting is not None


def _note_nesting(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    return state, "a pickle read with torch.load(weights_only=True); weights taken from its 'state_dict' entry"


TEXTUAL_INVERSION_FIX = (
    "a textual-inversion embedding: use lf-sample embeddings=FILE (or train on from it with "
    "model.textual_inversion.embeddings_from=FILE)"
)
LORA_FIX = "a LoRA, not a model: sample with lf-sample lora=FILE, or train on from it with model.lora_init=FILE"
LAYOUTS: tuple[Layout, ...] = (
    # Refused: not a Stable Diffusion pipeline checkpoint.
    Layout("kohya LoRA / LoCon", _any(LORA_PREFIXES, (".lora_down.", ".lora_up.")), fix=LORA_FIX),
    Layout("LyCORIS LoHa", _any(LORA_PREFIXES, (".hada_w",)), fix=LORA_FIX),
    Layout("LyCORIS LoKr", _any(LORA_PREFIXES, (".lokr_w",)), fix=LORA_FIX),
    Layout("diffusers/PEFT LoRA", _contains(*PEFT_LORA_PARTS), fix=LORA_FIX),
    Layout("textual inversion embedding", _textual_inversion, fix=TEXTUAL_INVERSION_FIX),
    Layout("ControlNet", _any(("control_model.",)), fix="a ControlNet, not a base model"),
    Layout("SDXL refiner", _any((SDXL_REFINER_PREFIX,)), fix="the SDXL refiner is out of scope (SDXL base imports)"),
    Layout(
        "diffusers model file (one part, diffusers names)",
        _diffusers_part,
        fix="import the whole diffusers folder instead: pretrained=FOLDER (the one with model_index.json)",
    ),
    Layout("VAE alone (ldm names)", _ldm_vae_alone, fix="a VAE alone, not a whole model"),
    Layout(
        "UNet without VAE or text encoder",
        _incomplete,
        fix="a whole checkpoint holds model.diffusion_model.*, first_stage_model.* and cond_stage_model.*",
    ),
    # Mapped to the canonical layout.
    Layout("ldm .ckpt (state_dict nesting)", _nested, _note_nesting),
    Layout("EMA copy beside the UNet (model_ema.*)", _ema_beside_unet, _take_ema),
    Layout("EMA-only UNet (model_ema.*)", _ema_alone, _only_ema),
    Layout("CLIP text encoder without text_model.", _clip_without_text_model, _add_text_model),
    Layout("OpenCLIP whole text tower", _open_clip_full_tower, _drop_open_clip_unused, keeps=True),
    Layout("prediction-type markers (v_pred, ztsnr)", _has_markers, _drop_markers),
    Layout("non-weight extras", _has_extras, _drop_extras),
    Layout("half precision (fp16/bf16)", _half, _note_half),
)


def normalize(file: WeightFile, source: str, ema: bool = False) -> Normalized:
    """Apply every matching row of :data:`LAYOUTS` in order.

    Args:
        file: the file as read (:func:`trainer.interop.safe_load.read_weight_file`).
        source: the file's path, for messages.
        ema: take the UNet from an EMA copy that sits beside it.

    Raises:
        KeyMapError: a refused layout (one line: the file, the layout, the fix); or EMA keys that do not fit.
    """
    out = Normalized(dict(file.state), dict(file.metadata))
    out.markers = [key for key in PREDICTION_MARKERS if key in file.state]
    for row in LAYOUTS:
        if not row.matches(WeightFile(out.state, out.metadata, file.nesting)):
            continue
        if row.apply is None:
            raise KeyMapError(f"{source}: {row.name} layout: refused, {row.fix}")
        try:
            state, note = row.apply(out.state, ema)
        except KeyMapError as error:
            raise KeyMapError(f"{source}: {row.name}: {str(error).removeprefix('the file: ')}") from None
        if row.keeps:
            out.set_aside |= {key: tensor for key, tensor in out.state.items() if key not in state}
        out.state = state
        out.layouts.append(row.name)
        out.notes.append(f"{row.name}: {note}")
    return out
