"""ldm's EMA copy of the UNet in a single file (``model_ema.*``): beside the UNet, or alone.

ldm's ``LitEma`` stores ``model.diffusion_model.input_blocks.0.0.weight`` as
``model_ema.diffusion_modelinput_blocks00weight``: the name without its dots. Beside the UNet the
names are matched against the UNet's; alone (a file pruned to the EMA), they are split again by the
grammar of ldm's UNet names: its module names, and numbers, where ``input_blocks`` and
``output_blocks`` take two (the block, then the one-digit slot within it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from trainer.interop.sd_single_file import EMA_PREFIX, NON_WEIGHT_KEYS, UNET_PREFIX, KeyMapError

EMA_MODEL = "diffusion_model"
# Every module and parameter name of ldm's UNetModel (SD 1.x/2.x; label_emb for SDXL); longest first.
LDM_UNET_NAMES = sorted(
    [
        "time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out", "in_layers",
        "emb_layers", "out_layers", "skip_connection", "op", "conv", "norm", "proj_in", "proj_out",
        "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj",
        "norm1", "norm2", "norm3", "weight", "bias",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
TWO_INDICES = ("input_blocks", "output_blocks")


def ema_weight_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ldm's EMA copy (``model_ema.*`` without its counters)."""
    return [key for key in state if key.startswith(EMA_PREFIX) and key not in NON_WEIGHT_KEYS]


def split_ema(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate ldm's EMA copy of the UNet (``model_ema.*``) from the rest of a file that holds the UNet too.

    The copy must cover the UNet exactly: a ``model_ema.*`` key with no UNet weight, or a UNet
    weight without its copy, raises.

    Returns:
        ``(the file without model_ema.*, the EMA weights under their model.diffusion_model.* names)``;
        the second is empty when the file holds no EMA copy.

    Raises:
        KeyMapError: the copy and the UNet do not match (keys named, with ``source``).
    """
    ema = {key: state[key] for key in ema_weight_keys(state)}
    rest = {key: tensor for key, tensor in state.items() if key not in ema}
    if not ema:
        return rest, {}
    unet_keys = [key for key in rest if key.startswith(UNET_PREFIX)]
    flat = {EMA_PREFIX + key[len("model.") :].replace(".", ""): key for key in unet_keys}
    unexpected = sorted(set(ema) - set(flat))
    missing = sorted(flat[key] for key in set(flat) - set(ema))
    problems = [f"no UNet weight for {unexpected}"] * bool(unexpected) + [f"no EMA copy of {missing}"] * bool(missing)
    if problems:
        raise KeyMapError(f"{source}: its EMA copy (model_ema.*) does not match the UNet: " + "; ".join(problems))
    return rest, {flat[key]: tensor for key, tensor in ema.items()}


def ema_key_to_unet_key(key: str) -> str | None:
    """An EMA key with its dots restored, or ``None`` when the name does not follow ldm's UNet names.

    ``model_ema.diffusion_modelinput_blocks11proj_inweight`` ->
    ``model.diffusion_model.input_blocks.1.1.proj_in.weight``
    """
    rest = key.removeprefix(EMA_PREFIX)
    if not rest.startswith(EMA_MODEL):
        return None
    rest, parts = rest[len(EMA_MODEL) :], []
    while rest:
        if digits := re.match(r"\d+", rest):
            number = digits.group()
            rest = rest[len(number) :]
            if parts and parts[-1] in TWO_INDICES:
                if len(number) < 2:
                    return None
                parts += [number[:-1], number[-1]]
            else:
                parts.append(number)
            continue
        name = next((name for name in LDM_UNET_NAMES if rest.startswith(name)), None)
        if name is None:
            return None
        parts.append(name)
        rest = rest[len(name) :]
    return UNET_PREFIX + ".".join(parts)


def ema_only_unet(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A file whose UNet is only its EMA copy: the copy under ``model.diffusion_model.*``, the rest unchanged.

    Raises:
        KeyMapError: ``model_ema.*`` keys that are no ldm UNet name (listed, with ``source``).
    """
    ema = ema_weight_keys(state)
    names = {key: ema_key_to_unet_key(key) for key in ema}
    if bad := sorted(key for key, name in names.items() if name is None):
        raise KeyMapError(f"{source}: these EMA keys (model_ema.*) name no weight of ldm's UNet: {bad}")
    out = {key: tensor for key, tensor in state.items() if key not in names}
    return out | {names[key]: state[key] for key in ema}
