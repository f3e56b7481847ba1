"""LyCORIS files (LoHa, LoKr) in kohya's naming <-> peft adapters on a diffusers UNet or a CLIP text encoder.

LyCORIS (KohakuBlueleaf/LyCORIS) writes one entry per adapted module, named as kohya names LoRA
modules (``lora_unet_`` / ``lora_te_`` + the module path with ``_`` for ``.``), with the parameters
peft's LoHa and LoKr layers have under the same names:

* LoHa (Hyeon-Woo et al. 2022, FedPara): ``hada_w1_a (out, r)``, ``hada_w1_b (r, in)``, ``hada_w2_a``,
  ``hada_w2_b``; convolutions flattened ``(r, in*k*k)``, or in Tucker form with ``hada_t1``/``hada_t2``
  ``(r, r, k, k)`` (peft's ``use_effective_conv2d``); update ``(w1a w1b) * (w2a w2b) * alpha / r``;
* LoKr (Yeh et al. 2024): ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b``
  (``lokr_t2`` in Tucker form); update ``kron(w1, w2)``, scaled by ``alpha / r`` when a factor is
  rank-decomposed. peft re-derives each module's factor shapes; :func:`lokr_settings` finds the
  config that reproduces them.

SDXL's files name the parts as kohya's SDXL LoRA files do: the UNet's modules under ldm's names
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, given as ``unet_names``, a diffusers
path -> ldm path map), the encoders as ``lora_te1_`` and ``lora_te2_``.

Other LyCORIS algorithms peft cannot hold in this form are refused by name (:data:`REFUSED_PARTS`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from lf_common.errors import DataError
from trainer.lora.adapters import LoraSettings, adaptable_module_names

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_KOHYA_PREFIXES = {**KOHYA_PREFIXES, "text_encoder": "lora_te1_"}
ModuleNames = Callable[[str], str]  # a UNet module's diffusers path -> its ldm path (SDXL's kohya names)
log = logging.getLogger(__name__)
TEXT_MODEL = "text_model_"  # kohya names CLIP's modules under text_model (transformers 5's CLIPTextModel does not)
KIND_PARTS = {"loha": ".hada_", "lokr": ".lokr_"}
# LyCORIS algorithms (and their parameter names) that peft does not load as written.
REFUSED_PARTS = {
    ".oft_blocks": "LyCORIS OFT",
    ".oft_diag": "LyCORIS Diag-OFT",
    ".a1.weight": "LyCORIS GLoRA",
    ".on_input": "LyCORIS (IA)^3",
    ".diff": "LyCORIS full (weight differences)",
    ".dora_scale": "DoRA (weight-decomposed)",
}


def lycoris_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"loha"`` or ``"lokr"`` for a LyCORIS file of that kind, else ``None``.

    Raises:
        DataError: a LyCORIS algorithm (or mix) that is not supported, named.
    """
    for part, name in REFUSED_PARTS.items():
        if any(part in key for key in state):
            raise DataError(f"{name} adapters: not supported (LoRA, LoCon, LoHa and LoKr are)")
    kinds = [kind for kind, part in KIND_PARTS.items() if any(part in key for key in state)]
    if len(kinds) > 1:
        raise DataError(f"a file mixing LyCORIS kinds {kinds}: not supported")
    return kinds[0] if kinds else None


def kohya_names(model: torch.nn.Module, part: str, unet_names: ModuleNames | None = None) -> dict[str, str]:
    """kohya's name of each module an adapter can wrap -> its name in ``model`` (SDXL's with ``unet_names``)."""
    sdxl = unet_names is not None
    prefixes = SDXL_KOHYA_PREFIXES if sdxl else KOHYA_PREFIXES
    names = {}
    for name in adaptable_module_names(model):
        name = name.removesuffix(".base_layer")  # a module that already holds an adapter
        names[kohya_name(part, name, unet_names)] = name
        if part != "unet":
            names[prefixes[part] + name.replace(".", "_")] = name  # CLIP without text_model too
    return names


def split_by_part(
    state: Mapping[str, torch.Tensor], models: Mapping[str, torch.nn.Module], unet_names: ModuleNames | None = None
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{part: {module name: {parameter: tensor}}}`` of a LyCORIS file for the parts in ``models``
    (an SDXL UNet's with ``unet_names``, its modules' ldm names).

    Raises:
        DataError: keys that name no module of the models (listed).
    """
    names = {part: kohya_names(model, part, unet_names) for part, model in models.items()}
    prefixes = SDXL_KOHYA_PREFIXES if unet_names is not None else KOHYA_PREFIXES
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {part: {} for part in models}
    unmapped, skipped = [], set()
    for key, tensor in state.items():
        module, _, parameter = key.partition(".")
        part = next((p for p, table in names.items() if module in table), None)
        other = next((p for p, prefix in prefixes.items() if p not in models and module.startswith(prefix)), None)
        if other is not None:
            skipped.add(other)
            continue
        if part is None:
            unmapped.append(key)
            continue
        out[part].setdefault(names[part][module], {})[parameter] = tensor
    if unmapped:
        raise DataError(f"LyCORIS keys that name no module of the UNet or text encoders: {sorted(unmapped)[:10]}")
    if skipped:
        log.warning("LyCORIS file: its %s adapters are not used here", " and ".join(sorted(skipped)))
    return {part: modules for part, modules in out.items() if modules}


def _loha_rank(parameters: Mapping[str, torch.Tensor]) -> int:
    return int(parameters["hada_w1_b"].shape[0])  # (r, in) or (r, in*k*k)


def loha_settings(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> LoraSettings:
    """The peft LoHa settings that hold ``modules`` (ranks from the shapes, alphas from ``.alpha``)."""
    ranks = {name: _loha_rank(p) for name, p in modules.items()}
    alphas = {name: float(p["alpha"]) if "alpha" in p else float(ranks[name]) for name, p in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    tucker = any("hada_t1" in p for p in modules.values())
    return LoraSettings(
        rank=rank,
        alpha=alpha,
        target_modules=sorted(modules),
        kind="loha",
        rank_pattern={f"^{n}$": r for n, r in ranks.items() if r != rank},
        alpha_pattern={f"^{n}$": a for n, a in alphas.items() if a != alpha},
        options={"use_effective_conv2d": tucker},
    )


def _bake_lokr_alpha(parameters: dict[str, torch.Tensor]) -> None:
    """LyCORIS scales a LoKr update by ``alpha / r`` only when a factor is rank-decomposed; fold that into the
    left factor, so the adapter runs at scale 1 (as diffusers' LoKr loader does)."""
    alpha = parameters.pop("alpha", None)
    decomposed = parameters.get("lokr_w2_b", parameters.get("lokr_w1_b"))
    if alpha is None or decomposed is None:
        return
    left = "lokr_w1" if "lokr_w1" in parameters else "lokr_w1_a"
    parameters[left] = parameters[left] * (float(alpha) / decomposed.shape[0])


def _lokr_factors(parameters: Mapping[str, torch.Tensor]) -> tuple[int, int, int | None]:
    """``(out_l, in_m, rank)`` of one LoKr module: its left factor's shape, and the rank of a decomposed factor."""
    if "lokr_w1" in parameters:
        out_l, in_m = parameters["lokr_w1"].shape
    else:
        out_l, in_m = parameters["lokr_w1_a"].shape[0], parameters["lokr_w1_b"].shape[1]
    for name in ("lokr_w2_a", "lokr_w1_a"):
        if name in parameters:
            return int(out_l), int(in_m), int(parameters[name].shape[1])
    return int(out_l), int(in_m), None


def lokr_settings(modules: Mapping[str, Mapping[str, torch.Tensor]], model: torch.nn.Module) -> LoraSettings:
    """The peft LoKr settings that reproduce ``modules``' factor shapes.

    peft factors each weight ``(out, in)`` as ``(out_l x out_k) (in_m x in_n)`` with
    ``factorization(dim, decompose_factor)`` and decomposes a factor only when the rank is small
    against it; so the factor is searched that gives the file's left factors, and each module's rank
    is the file's (or, for full factors, one large enough that peft keeps them full), as diffusers'
    ``_create_lokr_config`` does for linear layers (this one reads the dimensions from the modules,
    so convolutions fit too). Alphas are folded into the weights: alpha = rank.

    Raises:
        DataError: no factor reproduces the file's factor shapes.
    """
    from peft.tuners.lokr.layer import factorization

    layers = dict(model.named_modules())
    shapes, ranks = {}, {}
    for name, parameters in modules.items():
        weight = layers[name].weight  # (out, in, ...)
        out_l, in_m, rank = _lokr_factors(parameters)
        shapes[name] = (weight.shape[0], weight.shape[1], out_l, in_m)
        ranks[name] = rank or max(out_l, in_m, weight.shape[0] // out_l, weight.shape[1] // in_m)

    def reproduces(factor: int) -> bool:
        return all(factorization(o, factor)[0] == left and factorization(i, factor)[0] == m
                   for o, i, left, m in shapes.values())  # fmt: skip

    for factor in [*sorted({s[2] for s in shapes.values()}), -1]:
        if reproduces(factor):
            break
    else:
        raise DataError(f"LoKr factor shapes {sorted(set(shapes.values()))[:3]} match no peft decompose_factor")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{n}$": r for n, r in ranks.items() if r != rank}
    return LoraSettings(
        rank=rank,
        alpha=rank,
        target_modules=sorted(modules),
        kind="lokr",
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        options={
            "decompose_both": any("lokr_w1_a" in p for p in modules.values()),
            "decompose_factor": factor,
            "use_effective_conv2d": any("lokr_t2" in p for p in modules.values()),
        },
    )


def adapter_weights(
    kind: str, modules: Mapping[str, Mapping[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[LoraSettings, dict]:
    """The settings of one part's LyCORIS modules and their weights in peft's naming (``name.hada_w1_a``)."""
    modules = {name: dict(parameters) for name, parameters in modules.items()}
    if kind == "lokr":
        for parameters in modules.values():
            _bake_lokr_alpha(parameters)
        settings = lokr_settings(modules, model)
    else:
        settings = loha_settings(modules)
    state = {f"{name}.{k}": v for name, p in modules.items() for k, v in p.items() if k != "alpha"}
    return settings, state


def add_lycoris(model: torch.nn.Module, settings: LoraSettings, state: dict, adapter_name: str) -> None:
    """Add adapter ``adapter_name`` built from ``settings`` to ``model`` and load ``state`` into it exactly.

    Raises:
        DataError: weights that do not fit the adapter peft built (names and shapes).
    """
    model.add_adapter(settings.peft_config(), adapter_name=adapter_name)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    wrong = [f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in peft's {settings.kind}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]  # fmt: skip
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise DataError(
            f"LyCORIS {settings.kind} weights do not fit peft's adapter: wrong shapes {wrong[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)


def kohya_name(part: str, module: str, unet_names: ModuleNames | None = None) -> str:
    """kohya's (and LyCORIS') name of module ``module`` of ``part`` (``"unet"``, ``"text_encoder"`` or SDXL's
    ``"text_encoder_2"``); with ``unet_names`` (SDXL) the UNet's module under its ldm name and the encoders
    as ``lora_te1_``/``lora_te2_``."""
    sdxl = unet_names is not None or part == "text_encoder_2"
    if part == "unet" and unet_names is not None:
        module = unet_names(module)
    flat = module.replace(".", "_")
    if part != "unet" and not flat.startswith(TEXT_MODEL):
        flat = TEXT_MODEL + flat
    return (SDXL_KOHYA_PREFIXES if sdxl else KOHYA_PREFIXES)[part] + flat


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    return next((value for key, value in pattern.items() if key.strip("^$") == module), default)


def to_lycoris_file(
    part: str, state: Mapping[str, torch.Tensor], settings: LoraSettings, unet_names: ModuleNames | None = None
) -> dict[str, torch.Tensor]:
    """One part's LoHa/LoKr adapter (peft-named ``state``, e.g. ``...to_q.hada_w1_a``) as a LyCORIS file's
    entries: kohya names (SDXL's with ``unet_names``, see :func:`kohya_name`) and ``.alpha`` per module.

    peft scales every update by ``alpha / r``; LyCORIS' LoKr only when a factor is decomposed, so a
    LoKr module with two full factors gets the scale folded into its left factor.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        modules.setdefault(module, {})[parameter] = tensor.detach().clone().contiguous()
    out: dict[str, torch.Tensor] = {}
    for module, parameters in modules.items():
        rank = _pattern_value(settings.rank_pattern, module, settings.rank)
        alpha = float(_pattern_value(settings.alpha_pattern, module, settings.alpha))
        full = settings.kind == "lokr" and not any(k in parameters for k in ("lokr_w1_a", "lokr_w2_a"))
        if full:
            parameters["lokr_w1"] = parameters["lokr_w1"] * (alpha / rank)
        name = kohya_name(part, module, unet_names)
        out |= {f"{name}.{k}": v for k, v in parameters.items()}
        out[f"{name}.alpha"] = torch.tensor(float(rank) if full else alpha)
    return out
