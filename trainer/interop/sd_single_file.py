"""The original Stable Diffusion single-file key layout <-> diffusers' layout: the one key map.

A single ``.safetensors`` file in the original (CompVis ``ldm``) layout is what AUTOMATIC1111 and
ComfyUI load. It holds three parts under three prefixes::

    model.diffusion_model.*            the UNet     (ldm ``openaimodel.UNetModel`` names)
    first_stage_model.*                the VAE      (ldm ``AutoencoderKL`` names)
    cond_stage_model.transformer.*     the SD 1.x CLIP text encoder (Hugging Face CLIP names), or
    cond_stage_model.model.*           SD 2.x's OpenCLIP text encoder (OpenCLIP names, fused q/k/v)

SDXL files hold two text encoders instead, under ``conditioner.embedders.0.transformer.*`` (CLIP
ViT-L, Hugging Face names) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, OpenCLIP
names, fused q/k/v, ``text_projection`` ``(width, projection)``), and the UNet's size/crop and
pooled-text embedding (diffusers' ``add_embedding``) as ldm's ``label_emb.0``.

The map is derived from the diffusers configs (number of blocks, ``layers_per_block``, which blocks
have attention), so it covers any UNet / VAE of the SD family, from the tiny test model to SD 1.5
and SD 2.x (whose ``proj_in``/``proj_out`` are linear in both layouts, so no reshape is needed).
Both directions are strict: a key that no rule maps raises :class:`KeyMapError` naming it. The
text encoder's two layouts (SD 1.x's CLIP, SD 2.x's OpenCLIP) are mapped in
:mod:`trainer.interop.sd_text_encoder_keys`.

The rules follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``, with
the block indices computed from the config instead of SD 1.5's fixed ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lf_common.errors import DataError
from trainer.diffusion.unet_kinds import SDXL_ADDITION, is_sdxl_unet

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
EMA_PREFIX = "model_ema."
TEXT_LAYOUTS = ("sd1", "sd2", "sdxl")
V_PRED_KEY = "v_pred"
"""A top-level empty tensor that marks a v-prediction model: ComfyUI's saver writes it (``model_base.py``,
``state_dict_for_saving``) and reads it for SDXL (``supported_models.py``, ``SDXL.model_type``)."""
ZTSNR_KEY = "ztsnr"
"""Beside :data:`V_PRED_KEY`, an empty tensor that marks a zero-terminal-SNR schedule (ComfyUI's ``zsnr``;
diffusers' ``rescale_betas_zero_snr``)."""
PREDICTION_MARKERS = (V_PRED_KEY, ZTSNR_KEY)

# Keys that original checkpoints carry beside the weights: the DDPM schedule buffers of ldm's
# ``LatentDiffusion``, the EMA counters, CLIP's position ids. Import skips them, by name.
NON_WEIGHT_KEYS = frozenset(
    [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        TEXT_PREFIX + "embeddings.position_ids",
        SDXL_TEXT_PREFIX + "embeddings.position_ids",
        SDXL_OPEN_CLIP_PREFIX + "logit_scale",  # OpenCLIP's contrastive temperature: SDXL does not use it
    ]
)

# ResnetBlock2D (diffusers) -> ResBlock (ldm UNet)
UNET_RESNET_RENAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
# ResnetBlock2D (diffusers) -> ResnetBlock (ldm VAE)
VAE_RESNET_RENAMES = {"conv_shortcut.": "nin_shortcut."}
# Attention (diffusers, linear q/k/v/out) -> AttnBlock (ldm VAE, 1x1 convolutions)
VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


class KeyMapError(DataError):
    """A state dict does not fit the key map or the model (lists every offending key)."""


@dataclass(frozen=True)
class Rule:
    """Module ``diffusers_prefix`` is module ``original_prefix``; its parameter names change by ``renames``.

    ``conv1x1``: the original stores the module's linear weights ``(O, I)`` as 1x1 convolutions ``(O, I, 1, 1)``.
    """

    diffusers_prefix: str
    original_prefix: str
    renames: Mapping[str, str] = field(default_factory=dict)
    conv1x1: bool = False


def _per_block(value: int | Sequence[int], blocks: int) -> list[int]:
    return [value] * blocks if isinstance(value, int) else list(value)


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The map of a ``UNet2DConditionModel`` config onto ldm's ``UNetModel`` (without the file prefix).

    ldm numbers the encoder ``input_blocks.0`` (``conv_in``), then for each down block its
    ``layers_per_block`` (resnet, attention) pairs and a downsampler (not after the last block);
    the decoder ``output_blocks`` hold ``layers_per_block + 1`` pairs per up block, the upsampler
    sitting after the pair in the block's last entry.

    SDXL's added embedding (``addition_embed_type: text_time``: the pooled text and the size/crop
    ``time_ids``) is ldm's ``label_emb.0`` (a Linear, SiLU, Linear sequence); its sinusoidal
    ``add_time_proj`` has no weights.

    Raises:
        KeyMapError: the config has parts the original layout does not (class or other added embeddings).
    """
    if config.get("addition_embed_type") not in (None, SDXL_ADDITION):
        raise KeyMapError(
            f"UNet config addition_embed_type={config['addition_embed_type']!r}: not part of the SD single-file "
            f"layout (expected none, or {SDXL_ADDITION!r} for SDXL)"
        )
    for key in ("class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
        if config.get(key) is not None:
            raise KeyMapError(f"UNet config {key}={config[key]!r}: not part of the SD single-file layout")
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    blocks = len(down_types)
    layers = _per_block(config["layers_per_block"], blocks)
    rules = [
        Rule("time_embedding.linear_1.", "time_embed.0."),
        Rule("time_embedding.linear_2.", "time_embed.2."),
        Rule("conv_in.", "input_blocks.0.0."),
        Rule("conv_norm_out.", "out.0."),
        Rule("conv_out.", "out.2."),
    ]
    if is_sdxl_unet(config):
        rules += [Rule("add_embedding.linear_1.", "label_emb.0.0."), Rule("add_embedding.linear_2.", "label_emb.0.2.")]
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            rules.append(Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", UNET_RESNET_RENAMES))
            if _has_attention(block_type):
                rules.append(Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
            index += 1
        if i < blocks - 1:
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
            index += 1
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    rules.append(Rule("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET_RENAMES))
    if _has_attention(mid_type):
        rules.append(Rule("mid_block.attentions.0.", "middle_block.1."))
        rules.append(Rule("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET_RENAMES))
    else:
        rules.append(Rule("mid_block.resnets.1.", "middle_block.1.", UNET_RESNET_RENAMES))
    index = 0
    up_layers = list(reversed(layers))
    for i, block_type in enumerate(up_types):
        for j in range(up_layers[i] + 1):
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", UNET_RESNET_RENAMES))
            if _has_attention(block_type):
                rules.append(Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
            index += 1
        if i < blocks - 1:
            slot = 2 if _has_attention(block_type) else 1
            rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{index - 1}.{slot}.conv."))
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The map of an ``AutoencoderKL`` config onto ldm's ``AutoencoderKL`` (without the file prefix).

    ldm numbers the decoder's ``up`` blocks from the lowest resolution upwards in reverse of
    diffusers' ``up_blocks`` order; its mid attention uses 1x1 convolutions.
    """
    blocks = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    rules = [
        Rule("quant_conv.", "quant_conv."),
        Rule("post_quant_conv.", "post_quant_conv."),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_RENAMES, conv1x1=True),
        ]
        rules += [
            Rule(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", VAE_RESNET_RENAMES) for k in range(2)
        ]
    for i in range(blocks):
        for j in range(layers):
            rules.append(
                Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET_RENAMES)
            )
        if i < blocks - 1:
            rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        level = blocks - 1 - i
        for j in range(layers + 1):
            rules.append(
                Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", VAE_RESNET_RENAMES)
            )
        if i < blocks - 1:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{level}.upsample."))
    return rules


def rename_parts(name: str, renames: Mapping[str, str]) -> str:
    """``name`` with the first of ``renames``' prefixes it starts with replaced (unchanged when none)."""
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _find(key: str, prefixes: dict[str, Rule]) -> Rule | None:
    """The rule with the longest prefix of ``key`` (prefixes end with '.', so '1.' never matches '10.')."""
    best = None
    for prefix, rule in prefixes.items():
        if key.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rule)
    return best[1] if best else None


def to_original(state: Mapping[str, torch.Tensor], rules: list[Rule], prefix: str) -> dict[str, torch.Tensor]:
    """Rename a diffusers state dict to the original layout under ``prefix``.

    Raises:
        KeyMapError: keys that no rule maps (all of them, in the message).
    """
    by_prefix = {rule.diffusers_prefix: rule for rule in rules}
    out, unmapped = {}, []
    for key, tensor in state.items():
        rule = _find(key, by_prefix)
        if rule is None:
            unmapped.append(key)
            continue
        name = rule.original_prefix + rename_parts(key[len(rule.diffusers_prefix) :], rule.renames)
        if rule.conv1x1 and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (O, I) -> (O, I, 1, 1)
        out[prefix + name] = tensor
    if unmapped:
        raise KeyMapError(f"no rule maps these diffusers keys to the original layout: {sorted(unmapped)}")
    return out


def original_module_name(module: str, rules: list[Rule]) -> str:
    """A diffusers module path -> its ldm path, by the same rules as the weights
    (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``; ``down_blocks.0.resnets.0.conv1``
    -> ``input_blocks.1.0.in_layers.2``): the names kohya's SDXL LoRA files give UNet modules.

    Raises:
        KeyMapError: no rule maps the module.
    """
    (key,) = to_original({module + ".weight": torch.empty(0)}, rules, "")
    return key.removesuffix(".weight")


def to_diffusers(state: Mapping[str, torch.Tensor], rules: list[Rule], prefix: str) -> dict[str, torch.Tensor]:
    """Rename the keys under ``prefix`` of an original-layout state dict to diffusers' names.

    Keys outside ``prefix`` are not looked at. Raises :class:`KeyMapError` listing the keys under
    ``prefix`` that no rule maps.
    """
    inverse = [
        Rule(r.original_prefix, r.diffusers_prefix, {new: old for old, new in r.renames.items()}, r.conv1x1)
        for r in rules
    ]
    by_prefix = {rule.diffusers_prefix: rule for rule in inverse}
    out, unmapped = {}, []
    for key, tensor in state.items():
        if not key.startswith(prefix) or key in NON_WEIGHT_KEYS:
            continue
        local = key[len(prefix) :]
        rule = _find(local, by_prefix)
        if rule is None:
            unmapped.append(key)
            continue
        name = rule.original_prefix + rename_parts(local[len(rule.diffusers_prefix) :], rule.renames)
        if rule.conv1x1 and name.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # (O, I, 1, 1) -> (O, I)
        out[name] = tensor
    if unmapped:
        raise KeyMapError(f"no rule maps these keys of the original layout: {sorted(unmapped)}")
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`KeyMapError` unless ``state`` has exactly ``expected``'s keys and shapes.

    The message names ``source`` (the file) and every missing key, unexpected key and wrong shape
    (with the shape found and the shape the model's config expects).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key}: {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} expected"
        for key in sorted(set(state) & set(expected))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise KeyMapError(f"{source}: the weights do not match the model config: " + "; ".join(problems))
