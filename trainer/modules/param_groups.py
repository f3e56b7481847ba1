"""The optimizer's parameter groups: the UNet, the trained text encoders and their embeddings, each with
its own learning rate and weight decay (``optim.unet_lr``, ``optim.text_encoder_lr``, ...), and optionally
one group per UNet block (``optim.block_lr``).

The settings ride in the ``optim`` config beside the optimizer's own keys (``conf/optim/param_groups/``);
:func:`split_optim_config` takes them out before Hydra builds the optimizer partial, so any optimizer
class works as ``_target_``. A setting left ``None`` leaves the key out of the group, and the
optimizer's own default (``optim.lr``, ``optim.weight_decay``) applies.

``block_lr`` follows kohya's sd-scripts (``sdxl_train.py --block_lr``): one learning rate per block of the
original (LDM) UNet layout, in order: 0 the time and added embeddings, then the input blocks (``conv_in``,
then each resnet/attention layer of the down blocks and each downsampler), the middle block (resnet,
attention, resnet), the output blocks (each resnet/attention layer of the up blocks, the upsampler with the
last), and last the output norm and convolution. SDXL's UNet has 23 (0, 1-9, 10-12, 13-21, 22), as in
kohya; SD 1.x/2.x's has 29. A block given 0 is frozen (kohya leaves it out of the optimizer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from lf_common.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

UNET_EMBEDDINGS = ("time_embedding", "add_embedding", "class_embedding", "time_proj", "add_time_proj")
UNET_OUT = ("conv_norm_out", "conv_out")


@dataclass(frozen=True)
class ParamGroupSettings:
    """Per-part optimizer settings; ``None``: the optimizer's own value.

    Attributes:
        unet_lr, unet_weight_decay: the UNet's trained weights (or its LoRA adapters).
        text_encoder_lr, text_encoder_weight_decay: the trained text encoders, embeddings excepted.
        text_encoder_2_lr: SDXL's second encoder (``None``: ``text_encoder_lr``).
        embedding_lr, embedding_weight_decay: the trained text encoders' token and position embeddings
            (``None``: the text encoder's).
        block_lr: one learning rate per UNet block (see the module docstring); replaces ``unet_lr``.
    """

    unet_lr: float | None = None
    unet_weight_decay: float | None = None
    text_encoder_lr: float | None = None
    text_encoder_2_lr: float | None = None
    text_encoder_weight_decay: float | None = None
    embedding_lr: float | None = None
    embedding_weight_decay: float | None = None
    block_lr: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.block_lr is not None:
            object.__setattr__(self, "block_lr", tuple(float(lr) for lr in self.block_lr))
            if self.unet_lr is not None:
                raise ConfigError(
                    "optim.block_lr and optim.unet_lr are both set; block_lr gives the UNet's LRs: set one"
                )

    @classmethod
    def of(cls, value: ParamGroupSettings | Mapping[str, Any] | None) -> ParamGroupSettings:
        """The settings from themselves, a mapping of them (Hydra's ``_convert_: all`` turns a dataclass passed to
        ``instantiate`` into a dict) or ``None`` (all defaults)."""
        if isinstance(value, ParamGroupSettings):
            return value
        return cls(**(value or {}))


GROUP_KEYS = tuple(f.name for f in fields(ParamGroupSettings))
"""The keys of the ``optim`` config that are parameter-group settings, not the optimizer's arguments."""


def split_optim_config(optim: Any) -> tuple[Any, ParamGroupSettings]:
    """The optimizer's own config (a copy of ``optim`` without :data:`GROUP_KEYS`) and the group settings.

    The optimizer gets plain lists (``_convert_: all``): optimizers that keep ``betas`` as given would otherwise
    hold an OmegaConf list in their state, which a checkpoint cannot be loaded with (``weights_only``).

    Args:
        optim: the ``optim`` config node (a ``DictConfig`` or a mapping).
    """
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(optim, resolve=True) if isinstance(optim, DictConfig) else dict(optim)
    own = {"_convert_": "all", **{key: value for key, value in node.items() if key not in GROUP_KEYS}}
    return OmegaConf.create(own), ParamGroupSettings(**{key: node.get(key) for key in GROUP_KEYS})


def unet_blocks(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's blocks in kohya's ``block_lr`` order, each as the parameter-name prefixes it covers.

    Returns:
        One string per block: prefixes joined by ``|`` (e.g. ``down_blocks.0.resnets.1|down_blocks.0.attentions.1``).
    """
    blocks = ["|".join(UNET_EMBEDDINGS), "conv_in"]
    for i, down in enumerate(unet.down_blocks):
        for j in range(len(down.resnets)):
            blocks.append(f"down_blocks.{i}.resnets.{j}|down_blocks.{i}.attentions.{j}")
        if getattr(down, "downsamplers", None) is not None:
            blocks.append(f"down_blocks.{i}.downsamplers")
    mid = unet.mid_block
    if mid is not None:
        attentions = len(getattr(mid, "attentions", None) or [])
        for j in range(len(mid.resnets)):
            blocks.append(f"mid_block.resnets.{j}")
            if j < attentions:
                blocks.append(f"mid_block.attentions.{j}")
    for i, up in enumerate(unet.up_blocks):
        layers = len(up.resnets)
        for j in range(layers):
            prefixes = [f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}"]
            if j == layers - 1 and getattr(up, "upsamplers", None) is not None:
                prefixes.append(f"up_blocks.{i}.upsamplers")
            blocks.append("|".join(prefixes))
    blocks.append("|".join(UNET_OUT))
    return blocks


def block_index(name: str, blocks: Sequence[str]) -> int:
    """The index in ``blocks`` (:func:`unet_blocks`) of the UNet parameter ``name``.

    Raises:
        ConfigError: the name is in no block (a UNet part this numbering does not know).
    """
    name = name.removeprefix("_orig_mod.")
    for index, block in enumerate(blocks):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in block.split("|")):
            return index
    raise ConfigError(f"optim.block_lr: the UNet parameter {name} belongs to no block of kohya's numbering")


def checked_block_lr(unet: UNet2DConditionModel, block_lr: Sequence[float]) -> list[str]:
    """The UNet's blocks (:func:`unet_blocks`), after checking that ``block_lr`` has one value for each.

    Raises:
        ConfigError: a count that does not match, with this UNet's count and numbering.
    """
    blocks = unet_blocks(unet)
    if len(block_lr) != len(blocks):
        n_in = 1 + sum(1 for b in blocks if b.startswith(("conv_in", "down_blocks")))
        n_mid = sum(1 for b in blocks if b.startswith("mid_block"))
        raise ConfigError(
            f"optim.block_lr has {len(block_lr)} values; this UNet has {len(blocks)} blocks (kohya's numbering: "
            f"0 embeddings, 1-{n_in - 1} input, {n_in}-{n_in + n_mid - 1} middle, "
            f"{n_in + n_mid}-{len(blocks) - 2} output, {len(blocks) - 1} out): give {len(blocks)} values"
        )
    return blocks


def freeze_zero_lr_blocks(unet: UNet2DConditionModel, block_lr: Sequence[float] | None) -> None:
    """Freeze the UNet blocks whose ``block_lr`` is 0 (kohya trains them not at all), before any wrapper sees
    which parameters train."""
    if block_lr is None:
        return
    blocks = checked_block_lr(unet, block_lr)
    for name, param in unet.named_parameters():
        if block_lr[block_index(name, blocks)] == 0:
            param.requires_grad_(False)


def _group(name: str, params: list[torch.Tensor], lr: float | None, weight_decay: float | None) -> dict[str, Any]:
    group: dict[str, Any] = {"name": name, "params": params}
    if lr is not None:
        group["lr"] = lr
    if weight_decay is not None:
        group["weight_decay"] = weight_decay
    return group


def _trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]


def parameter_groups(
    unet: UNet2DConditionModel,
    text_encoders: Sequence[torch.nn.Module] = (),
    settings: ParamGroupSettings | None = None,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, named (``name``: ``unet``, ``unet.block<i>``, ``text_encoder``,
    ``text_encoder_2``, ``embeddings``); empty groups are left out.

    Args:
        unet: the UNet (its trainable parameters: full weights, or LoRA adapters).
        text_encoders: the trained text encoders, first and (SDXL) second, CLIP models from transformers.
        settings: per-part learning rates and weight decay (``None``: one value each, the optimizer's).
    """
    settings = settings or ParamGroupSettings()
    groups = []
    if settings.block_lr is not None:
        blocks = checked_block_lr(unet, settings.block_lr)
        per_block: dict[int, list[torch.Tensor]] = {}
        for name, param in unet.named_parameters():
            if param.requires_grad:
                per_block.setdefault(block_index(name, blocks), []).append(param)
        for index in sorted(per_block):
            lr = settings.block_lr[index]
            groups.append(_group(f"unet.block{index}", per_block[index], lr, settings.unet_weight_decay))
    else:
        groups.append(_group("unet", _trainable(unet.parameters()), settings.unet_lr, settings.unet_weight_decay))
    embeddings: list[torch.Tensor] = []
    for number, encoder in enumerate(text_encoders):
        model = getattr(encoder, "text_model", encoder)  # transformers 5 has no text_model level
        embedding_ids = {id(p) for p in model.embeddings.parameters()}
        embeddings += _trainable(p for p in encoder.parameters() if id(p) in embedding_ids)
        rest = _trainable(p for p in encoder.parameters() if id(p) not in embedding_ids)
        lr = settings.text_encoder_lr
        if number == 1 and settings.text_encoder_2_lr is not None:
            lr = settings.text_encoder_2_lr
        name = "text_encoder" if number == 0 else f"text_encoder_{number + 1}"
        groups.append(_group(name, rest, lr, settings.text_encoder_weight_decay))
    lr, weight_decay = settings.embedding_lr, settings.embedding_weight_decay
    lr = settings.text_encoder_lr if lr is None else lr
    weight_decay = settings.text_encoder_weight_decay if weight_decay is None else weight_decay
    groups.append(_group("embeddings", embeddings, lr, weight_decay))
    return [group for group in groups if group["params"]]
