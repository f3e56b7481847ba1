"""The memory plan as a table, and what to shrink when it does not fit.

:func:`plan_table` prints one row per part (GiB on the training device, and in host memory under
ZeRO-Offload), the total, and against ``plan.device_memory_gb`` the margin; :func:`advice` names the parts to
shrink, largest first, each with the settings that shrink it and are not already set.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.memory.plan import GIB, MemoryPlan, RunSetup


@dataclass(frozen=True)
class PlanContext:
    """What the table says about the run besides the bytes.

    Attributes:
        setup: precision, strategy, optimizer, EMA.
        batch_size: samples per rank the activations are for.
        latent_size: the latents' side (pixels / 8).
        gradient_checkpointing: whether the UNet recomputes its activations.
        lora: whether only adapters train.
    """

    setup: RunSetup
    batch_size: int
    latent_size: int
    gradient_checkpointing: bool = False
    lora: bool = False


def gib(n: int) -> str:
    """Bytes as ``GiB`` with two decimals, or ``MiB`` below a tenth of a GiB (``0 B`` for a part that is absent)."""
    if n == 0:
        return "0 B"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def count(n: int) -> str:
    """A parameter count in millions with one decimal (``2567.5 M``), or in full below 100,000 (``36,864``)."""
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def plan_table(plan: MemoryPlan, context: PlanContext, device_memory_gb: float | None = None) -> str:
    """The plan as a text table, one rank's view.

    Args:
        plan: the plan.
        context: what it is of.
        device_memory_gb: the device's memory in GiB (``None``: no comparison).
    """
    setup = context.setup
    head = (
        f"memory plan per rank: {count(plan.trainable_numel)} of {count(plan.numel)} parameters trained; "
        f"{setup.precision}, strategy {setup.strategy}"
        + (f" (ZeRO-{setup.zero_stage})" if setup.strategy == "deepspeed" else "")
        + (f" over {setup.world_size} ranks" if setup.world_size > 1 else "")
        + f", optimizer {setup.optimizer.family}; activations at batch {context.batch_size}, "
        f"{context.latent_size}x{context.latent_size} latents"
        + (", gradient checkpointing" if context.gradient_checkpointing else "")
    )
    width = max(len(name) for name in [*plan.parts, "total"])
    host = f"  {'host':>10}" if plan.host else ""
    lines = [head, f"  {'part':<{width}}  {'device':>10}{host}"]
    for name, size in plan.parts.items():
        extra = f"  {gib(plan.host[name]) if name in plan.host else '':>10}" if plan.host else ""
        lines.append(f"  {name:<{width}}  {gib(size):>10}{extra}".rstrip())
    total_host = f"  {gib(sum(plan.host.values())):>10}" if plan.host else ""
    lines.append(f"  {'total':<{width}}  {gib(plan.total):>10}{total_host}")
    if device_memory_gb is not None:
        budget = device_memory_gb * GIB
        verdict = "fits" if plan.total <= budget else "does NOT fit"
        lines.append(f"  {verdict} in {device_memory_gb:g} GiB ({gib(int(budget - plan.total))} left)")
        lines += [f"  shrink {line}" for line in advice(plan, context, budget)]
    return "\n".join(lines)


def fixes(part: str, context: PlanContext) -> list[str]:
    """The settings that shrink ``part``, leaving out those the run has already."""
    setup = context.setup
    family = setup.optimizer.family
    sharded = setup.strategy in ("fsdp", "deepspeed")
    options: dict[str, list[tuple[bool, str]]] = {
        "optimizer state": [
            (family not in ("bitsandbytes", "adafactor"), "optim=adamw8bit"),
            (family not in ("bitsandbytes", "adafactor") and not sharded, "optim=adafactor"),
            (not sharded, "strategy=deepspeed_stage_2 with more GPUs"),
            (setup.strategy == "deepspeed" and not setup.offload_optimizer, "strategy=deepspeed_stage_2_offload"),
            (not context.lora, "experiment=lora"),
        ],
        "master weights": [(not setup.offload_optimizer, "strategy=deepspeed_stage_2_offload")],
        "gradients": [
            (not context.lora, "experiment=lora"),
            (setup.strategy != "deepspeed" or setup.zero_stage < 2, "strategy=deepspeed_stage_2 with more GPUs"),
        ],
        "weights": [
            (setup.precision not in ("bf16-true", "16-true"), "trainer.precision=bf16-true"),
            (setup.strategy != "fsdp" and setup.zero_stage < 3, "strategy=deepspeed_stage_3 or fsdp with more GPUs"),
        ],
        "EMA": [(True, "callbacks.ema=null"), (not setup.ema_on_host, "callbacks.ema.device=cpu")],
        "activations": [
            (not context.gradient_checkpointing, "model.gradient_checkpointing=true"),
            (context.batch_size > 1, "a smaller data.batch_size with trainer.accumulate_grad_batches"),
            (setup.precision == "32-true", "trainer.precision=bf16-mixed"),
        ],
    }
    return [text for applies, text in options.get(part, []) if applies]


def advice(plan: MemoryPlan, context: PlanContext, budget: float) -> list[str]:
    """What to shrink when the plan exceeds ``budget`` bytes: the parts from the largest down until the excess
    is covered, each as ``"<part> <size>: <fix>; or <fix>"``; empty when it fits."""
    excess = plan.total - budget
    lines: list[str] = []
    for name, size in sorted(plan.parts.items(), key=lambda item: -item[1]):
        if excess <= 0:
            break
        options = fixes(name, context)
        if size <= 0 or not options:
            continue
        lines.append(f"{name} {gib(size)}: {'; or '.join(options)}")
        excess -= size
    return lines
