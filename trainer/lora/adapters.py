"""Add LoRA adapters to a diffusers UNet or a transformers CLIP text encoder with peft; only the
adapters train.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight ``W`` gets
a trainable update ``(alpha / rank) * B @ A`` with ``A`` of shape ``(rank, in)`` and ``B`` of shape
``(out, rank)``, ``B`` starting at zero so training starts from the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from lf_common.errors import ConfigError
from trainer.lora.peft_integration_private import forget_adapters

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's, as train_dreambooth_lora.py


ADAPTER_KINDS = ("lora", "loha", "lokr")


@dataclass
class LoraSettings:
    """What ``model.lora`` configures, or what a LoRA file brought (then with per-module patterns).

    Attributes:
        rank: the rank ``r`` of the update.
        alpha: the scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input during training (LoRA; LoHa/LoKr: rank dropout).
        target_modules: module names (or name suffixes) that get an adapter, e.g. ``to_q``.
        kind: ``"lora"``, or LyCORIS' ``"loha"`` (Hadamard product, Hyeon-Woo et al. 2022) or ``"lokr"``
            (Kronecker product, Yeh et al. 2024), both through peft.
        rank_pattern, alpha_pattern: per-module rank and alpha where they differ (peft's patterns).
        options: further settings of the peft config (``use_effective_conv2d``, ``decompose_factor``...).
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    kind: str = "lora"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError(f"model.lora.kind={self.kind!r}: expected one of {', '.join(ADAPTER_KINDS)}")

    def peft_config(self) -> PeftConfig:
        common = dict(r=self.rank, target_modules=list(self.target_modules), rank_pattern=dict(self.rank_pattern),
                      alpha_pattern=dict(self.alpha_pattern), **self.options)  # fmt: skip
        if self.kind == "loha":
            return LoHaConfig(alpha=self.alpha, rank_dropout=self.dropout, **common)
        if self.kind == "lokr":
            return LoKrConfig(alpha=self.alpha, rank_dropout=self.dropout, **common)
        return LoraConfig(lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights="gaussian", **common)

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules LoRA can wrap (Linear and Conv2d), e.g. ``mid_block.attentions.0...to_q``."""
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def check_target_modules(model: torch.nn.Module, targets: Sequence[str], config_key: str = "model.lora") -> None:
    """Raise a ValueError naming every target that matches no module, with the names available.

    Args:
        config_key: the config entry the targets came from, for the message.
    """
    names = adaptable_module_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        suffixes = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else ".".join(n.split(".")[-2:])
                           for n in names})  # fmt: skip
        raise ConfigError(
            f"{config_key}.target_modules: {missing} match no Linear/Conv2d module of the "
            f"{type(model).__name__}; available names: {suffixes}"
        )


def add_lora(model: torch.nn.Module, settings: LoraSettings, config_key: str = "model.lora") -> int:
    """Freeze ``model`` and add LoRA adapters named ``"default"`` (peft, through the ``add_adapter`` of
    diffusers' UNet or of a transformers model).

    Args:
        config_key: the config entry of ``settings``, named when a target module does not exist.

    Returns:
        The number of trainable (adapter) parameters.
    """
    check_target_modules(model, settings.target_modules, config_key)
    model.requires_grad_(False)
    model.add_adapter(settings.peft_config())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mark_adapters_trainable(model: torch.nn.Module, adapter_name: str = "default") -> int:
    """Freeze ``model`` except the weights of adapter ``adapter_name`` (any peft tuner: LoRA, LoHa, LoKr).

    Returns:
        The number of trainable (adapter) parameters.
    """
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layer = getattr(module, layer_name)
                if adapter_name in layer:
                    layer[adapter_name].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight, ``W + (alpha / rank) B A``, and drop the adapter layers."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    remove_adapters(model)


def remove_adapters(model: torch.nn.Module) -> None:
    """Drop the adapter layers (unmerged adapters are discarded): ``model`` is its base again."""
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    forget_adapters(model)


@dataclass
class AdapterWeights:
    """One model's LoRA adapters.

    Attributes:
        state: peft-named weights, e.g. ``...to_q.lora_A.weight`` ``(rank, in)`` and
            ``...to_q.lora_B.weight`` ``(out, rank)``.
        settings: the rank, alpha and targets they were trained with.
    """

    state: dict[str, torch.Tensor]
    settings: LoraSettings


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` in peft's naming (``...to_q.lora_A.weight``)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
