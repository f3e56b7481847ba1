"""The private flag of the peft integrations of transformers and diffusers that latentforge sets.

``PeftAdapterMixin`` (transformers, and diffusers' copy of it) records that a model holds peft
adapters in ``_hf_peft_config_loaded``; ``add_adapter`` and the adapter methods read it.
``trainer.lora.adapters.remove_adapters`` makes a model its base again (the LoRA wrappers replaced
by their base layers, ``peft_config`` deleted), and must clear the flag too, or a later
``add_adapter`` takes the deleted config as still there. transformers' public ``delete_adapter``
clears it but keeps the LoRA wrapper modules (their ``base_layer.*`` weight names), and diffusers'
``unload_lora`` exists only on diffusers models; neither does both kinds of model.
"""

from __future__ import annotations

import torch

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/lora/peft_integration_private.py"


def forget_adapters(model: torch.nn.Module) -> None:
    """Record that ``model`` (a transformers or diffusers model) holds no peft adapters any more."""
    model._hf_peft_config_loaded = False


CONTRACTS = tuple(
    PrivateName(upstream, owner, "_hf_peft_config_loaded", ADAPTER, kind="attribute")  # a class attribute
    for upstream, owner in (
        ("transformers", "transformers.integrations.peft.PeftAdapterMixin"),
        ("diffusers", "diffusers.loaders.peft.PeftAdapterMixin"),
    )
)
