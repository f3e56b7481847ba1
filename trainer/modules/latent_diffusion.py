"""LatentDiffusion: trains a diffusers UNet on precomputed latents and text embeddings.

The module holds the UNet only: no VAE and no text encoder run in the training step, because the
latent shards already hold their outputs (see ``data_pipelines.latents.format``). With
``train_text_encoder`` the text encoder(s) train too: the step encodes the shards' token ids
(``lf-precompute keep_token_ids=true``) with them (:mod:`trainer.modules.text_encoder_training`).

Stable Diffusion XL trains through the same module: a UNet whose config has
``addition_embed_type: text_time`` also receives ``added_cond_kwargs`` (``text_embeds``: the pooled
embedding, ``time_ids``: the size and crop micro-conditioning), which SDXL latent shards hold.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.optim import Optimizer

from lf_common.errors import ConfigError
from trainer.checkpoint.keys import CHECKPOINT_KEY
from trainer.diffusion.objective import LossTerms, Objective, fixed_timestep_loss
from trainer.diffusion.unet_kinds import is_sdxl_unet
from trainer.interop.lora_formats import sdxl_lora_names
from trainer.interop.lora_loading import trainable_adapters_from_file
from trainer.lora.adapters import LoraSettings, add_lora
from trainer.modules import conditioning as cond
from trainer.modules.conditioning import NO_LOSS_MASKS, NO_UNCOND_TEXT
from trainer.modules.loss_logging import gradient_norm, loss_by_dataset, loss_by_timestep_bucket
from trainer.modules.param_groups import ParamGroupSettings, freeze_zero_lr_blocks, parameter_groups
from trainer.modules.schedule_free import use_evaluation_weights, use_training_weights
from trainer.modules.text_encoder_step import TextEncoderStep
from trainer.modules.text_encoder_training import TextEncoderParts, record_adapters

log = logging.getLogger(__name__)


class SkipOptimizerStep(Exception):
    """Raised after the gradients are computed (``on_before_optimizer_step``) to skip this optimizer step."""


class LatentDiffusion(TextEncoderStep, L.LightningModule):
    """Denoising training of a conditional UNet in latent space.

    Args:
        unet: the network, ``unet(x_t (B,C,h,w), t (B,), encoder_hidden_states (B,T,D))``.
        noise_scheduler: a diffusers training scheduler (``DDPMScheduler``): its betas and
            ``prediction_type`` define the forward process and the target.
        optimizer: a partial taking the parameters (``_partial_: true`` in the config).
        lr_scheduler: a partial taking the optimizer, stepped every optimizer step; or ``None``.
        caption_dropout: probability of replacing a sample's text embedding with ``uncond_text``
            (so the model learns the unconditional score classifier-free guidance needs).
        uncond_text: the empty caption's embedding ``(T, D)``; needed when ``caption_dropout > 0``.
            When not given, :meth:`setup` takes it from the trainer's data module (``uncond_text``).
        uncond_pooled: SDXL: the unconditional pooled embedding ``(P,)`` (zeros in SDXL shards), dropped
            in together with ``uncond_text``; when not given, taken from the data module (``uncond_pooled``).
        objective: timestep sampling, loss weighting and noise tweaks (default: uniform, unweighted).
        validation_timesteps: the fixed timesteps of the validation loss (default: 10, evenly spaced).
        timestep_buckets: the training loss is also logged per this many ranges of timesteps.
        gradient_checkpointing: recompute the UNet blocks' activations in the backward pass
            (diffusers' ``enable_gradient_checkpointing``): less memory, about a third more compute.
        channels_last: keep the UNet weights and its inputs in ``torch.channels_last`` layout
            (faster convolutions on tensor-core GPUs).
        compile_unet: compile the UNet's forward with ``torch.compile`` (in place, so parameter
            names and checkpoints are unchanged); ``compile_options`` go to it (``mode``, ``backend``, ...).
        lora: when given, the UNet is frozen and only LoRA adapters on ``lora.target_modules`` train.
        lora_from: a LoRA file (kohya LoRA/LoCon, diffusers/PEFT, LyCORIS LoHa/LoKr) whose UNet adapters,
            as they are, train on (the base frozen); instead of ``lora``.
        pretrained: the folder the UNet was loaded from (``model=pretrained``), kept in the hyperparameters.
        param_groups: per-part learning rates and weight decay (``optim.unet_lr``, ``optim.block_lr``, ...;
            :mod:`trainer.modules.param_groups`); ``None``: the optimizer's own for every parameter.
        masked_loss: weigh each latent pixel's error by the batch's ``loss_mask`` ``(B, 1, h, w)`` (latent
            shards with loss masks; samples without one come as ones): the weight is
            ``mask_floor + (1 - mask_floor) * mask`` (:meth:`pixel_weights`). The training data must hold masks.
        mask_floor: the weight of the masked-out part (0: it teaches nothing; e.g. 0.1 keeps a little of it).
        train_text_encoder: train the text encoder(s) ``text_encoders`` too: each step encodes the batch's
            ``token_ids`` ``(B, n, L)`` (SDXL: and ``token_ids_2``) with them, in the shards' recorded text encoding
            (long prompts, ``clip_skip``), and a dropped caption is the empty caption's ids, encoded likewise.
        text_encoders: the text encoder(s) that train and their tokenizer(s) (``model.text_encoders``: those that
            made the shards); given, they train (DreamBooth's recipes give them and encode their prompts).
        text_encoder_lora: when given, only LoRA/LyCORIS adapters on the (first) text encoder train.
        text_encoder_2_lora: as ``text_encoder_lora``, for SDXL's second encoder (with ``train_text_encoder``,
            ``None``: ``text_encoder_lora``'s settings).

    A schedule-free optimizer (``optim=schedule_free_adamw``) is switched to its training weights before each
    batch and to its evaluation weights after each optimizer step, so validation, the EMA, checkpoints and
    exports see the evaluation weights; a resume loads them and switches back exactly as the run did.
    """

    #: Constructor arguments that are objects, not hyperparameters (checkpoints load with
    #: ``weights_only=True``); a subclass adds its own, since the hyperparameters are collected
    #: from every ``__init__`` of the class chain.
    hparams_ignore: tuple[str, ...] = (
        "unet", "noise_scheduler", "optimizer", "lr_scheduler", "uncond_text", "objective", "lora", "uncond_pooled",
        "param_groups", "text_encoders", "text_encoder_lora", "text_encoder_2_lora",
    )  # fmt: skip

    def __init__(
        self,
        unet: UNet2DConditionModel,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[..., Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        caption_dropout: float = 0.0,
        uncond_text: torch.Tensor | None = None,
        objective: Objective | None = None,
        validation_timesteps: Sequence[int] | None = None,
        timestep_buckets: int = 4,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_options: dict[str, Any] | None = None,
        lora: LoraSettings | None = None,
        pretrained: str | None = None,
        lora_from: str | None = None,
        uncond_pooled: torch.Tensor | None = None,
        param_groups: ParamGroupSettings | Mapping[str, Any] | None = None,
        masked_loss: bool = False,
        mask_floor: float = 0.0,
        train_text_encoder: bool = False,
        text_encoders: TextEncoderParts | None = None,
        text_encoder_lora: LoraSettings | None = None,
        text_encoder_2_lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore), logger=False)
        self.unet = unet.train()  # from_pretrained returns eval mode
        self.lora = lora
        if lora is not None and lora_from:
            raise ConfigError("model.lora and model.lora_from are both set; the file defines its adapters: set one")
        if lora is not None:
            add_lora(self.unet, lora)
        if lora_from:
            self.lora = trainable_adapters_from_file(self.unet, lora_from, sdxl_lora_names(self.unet))
        self.param_group_settings = ParamGroupSettings.of(param_groups)
        freeze_zero_lr_blocks(self.unet, self.param_group_settings.block_lr)
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.caption_dropout = caption_dropout
        if not 0.0 <= mask_floor <= 1.0:
            raise ConfigError(f"objective.mask_floor={mask_floor}: expected a weight in [0, 1]")
        self.masked_loss = masked_loss
        self.mask_floor = mask_floor
        self.objective = objective or Objective()
        steps = noise_scheduler.config.num_train_timesteps
        self.validation_timesteps = list(validation_timesteps or range(steps // 20, steps, steps // 10))
        self.timestep_buckets = timestep_buckets
        # Not a buffer: it may arrive in setup (below), after the EMA callback has copied the module.
        self.uncond_text = uncond_text
        self.uncond_pooled = uncond_pooled
        self.dataset_names: list[str] = []  # data=mixed: the name of each dataset_index (from the data module)
        self.channels_last = channels_last
        self.flops_per_batch: int | None = None  # set by trainer.callbacks.throughput (Lightning reads it)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        self.compile_unet = compile_unet
        self._first_step_started: float | None = None
        if compile_unet:
            unet.compile(**(compile_options or {}))
        self._init_text_encoders(train_text_encoder, text_encoders, text_encoder_lora, text_encoder_2_lora)

    def setup(self, stage: str) -> None:
        """Take the empty caption's embedding from the data module when it was not given (data that a
        data module prepares in its own ``setup``, as DreamBooth's, exists only from then on), onto
        this rank's device. A masked loss on training data without loss masks is refused here, before a step.

        Raises:
            ConfigError: caption dropout without an empty caption's embedding, or ``masked_loss`` on data
                without loss masks.
        """
        datamodule = self.trainer.datamodule
        if stage == "fit" and self.masked_loss and not getattr(datamodule, "loss_masks", False):
            raise ConfigError(NO_LOSS_MASKS)
        if self.uncond_text is None and (self.caption_dropout > 0 or getattr(datamodule, "dataset_names", None)):
            self.uncond_text = getattr(datamodule, "uncond_text", None)  # several datasets: any may drop captions
            if self.uncond_text is None and self.caption_dropout > 0:
                raise ConfigError(NO_UNCOND_TEXT)
        self.dataset_names = list(getattr(datamodule, "dataset_names", None) or [])
        if self.uncond_pooled is None and self.sdxl:
            self.uncond_pooled = getattr(self.trainer.datamodule, "uncond_pooled", None)
        if self.uncond_text is not None:
            self.uncond_text = self.uncond_text.to(self.trainer.strategy.root_device)
        if self.uncond_pooled is not None:
            self.uncond_pooled = self.uncond_pooled.to(self.trainer.strategy.root_device)
        if self.train_text_encoder:
            self._setup_token_ids(datamodule)

    @property
    def sdxl(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (``addition_embed_type: text_time``)."""
        return is_sdxl_unet(self.unet.config)

    def caption_drop_mask(
        self, size: int, device: torch.device, rates: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Which of ``size`` samples lose their caption this step ``(B,)`` bool, or ``None`` without dropout
        (:func:`~trainer.modules.conditioning.caption_drop_mask`; ``rates`` ``(B,)``: each sample's own, NaN:
        ``caption_dropout``)."""
        return cond.caption_drop_mask(size, device, self.caption_dropout, rates)

    def drop_captions(self, text: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace each sample's text ``(B, T, D)`` by the empty caption's with probability ``caption_dropout``
        (or where ``drop`` ``(B,)`` says): :func:`~trainer.modules.conditioning.drop_captions`."""
        return cond.drop_captions(text, drop, self.caption_dropout, self.uncond_text)

    def added_conditioning(
        self, batch: dict[str, torch.Tensor], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` of a batch (``None`` for a UNet without ``text_time`` embedding):
        :func:`~trainer.modules.conditioning.added_conditioning`."""
        return cond.added_conditioning(batch, self.sdxl, drop, self.uncond_pooled)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        """The denoising loss of one batch.

        The objective's math (noise, ``x_t``, target, loss) runs in float32 whatever the precision;
        only the UNet's inputs are cast, in :meth:`_predict`.

        Args:
            batch: ``latents`` ``(B, C, h, w)`` and ``text`` ``(B, T, D)`` (any float dtype); for an
                inpainting UNet also ``mask`` ``(B, 1, h, w)`` and ``masked_latents`` ``(B, C, h, w)``; for an
                SDXL UNet also ``pooled`` ``(B, P)`` and ``time_ids`` ``(B, 6)``. A dropped caption drops its
                text and its pooled embedding together (one mask). Optional: ``loss_weights``
                ``(B, 1, h, w)`` weigh each latent pixel's error (masked loss), ``sample_weights`` ``(B,)``
                each sample's (e.g. a regularization set's prior-loss weight), ``caption_dropout`` ``(B,)``
                each sample's dropout rate (NaN: ``caption_dropout``).
        """
        latents = batch["latents"].float()
        drop = self.caption_drop_mask(latents.shape[0], latents.device, batch.get("caption_dropout"))
        if self.train_text_encoder:  # the dropped samples' ids are the empty caption's: text and pooled follow
            batch = self.encode_token_ids(batch, drop)
            text, drop = batch["text"].float(), None
        else:
            text = self.drop_captions(batch["text"].float(), drop)
        predictor = self._predictor(batch, self.added_conditioning(batch, drop))
        return self.objective.loss(
            predictor,
            self.noise_scheduler,
            latents,
            text,
            pixel_weights=self.pixel_weights(batch),
            sample_weights=batch.get("sample_weights"),
        )

    def pixel_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The weight of each latent pixel's error ``(B, 1, h, w)``, or ``None`` (all 1): with ``masked_loss``,
        ``mask_floor + (1 - mask_floor) * loss_mask`` (:func:`~trainer.modules.conditioning.pixel_weights`)."""
        return cond.pixel_weights(batch, self.masked_loss, self.mask_floor)

    def _predictor(
        self, batch: dict[str, torch.Tensor], added: dict[str, torch.Tensor] | None = None
    ) -> Callable[..., torch.Tensor]:
        """:meth:`_predict` with the batch's inpainting conditioning
        (:func:`~trainer.modules.conditioning.inpainting_conditioning`) and SDXL's ``added`` conditioning bound
        (none for a plain UNet).

        Raises:
            ConfigError: the UNet wants inpainting conditioning and the batch has none, or the reverse.
        """
        extra = cond.inpainting_conditioning(batch, self.unet.config.in_channels)
        if extra is None:
            return partial(self._predict, added=added) if added is not None else self._predict
        return partial(self._predict, conditioning=extra, added=added)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the UNet's weights have now: float32 under autocast (``*-mixed``) and ``32-true``,
        bfloat16/float16 under ``bf16-true``/``16-true`` and DeepSpeed's bf16/fp16 modes (which cast the
        module and run no autocast)."""
        return next(p.dtype for p in self.unet.parameters() if p.is_floating_point())

    def _predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        conditioning: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction ``(B, C, h, w)`` for ``x_t`` ``(B, C, h, w)``, ``t`` ``(B,)`` and text ``(B, T, D)``
        (and an inpainting UNet's ``conditioning`` ``(B, 1 + C, h, w)``, concatenated after ``x_t``; SDXL's
        ``added`` conditioning: ``text_embeds`` ``(B, P)`` and ``time_ids`` ``(B, 6)``).

        The one place the UNet is called in training and validation: its inputs follow the dtype of its
        weights (and ``channels_last``), so every strategy and precision feeds it what it holds.
        """
        dtype = self.unet_dtype
        if conditioning is not None:
            noisy = torch.cat([noisy, conditioning.to(noisy)], dim=1)  # (B, C + 1 + C, h, w)
        noisy = noisy.to(dtype, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if added is not None:  # time_ids stay float32: the UNet's sinusoidal projection computes in float32
            added = {"text_embeds": added["text_embeds"].to(dtype), "time_ids": added["time_ids"].float()}
            return self.unet(noisy, timesteps, encoder_hidden_states=text.to(dtype), added_cond_kwargs=added).sample
        return self.unet(noisy, timesteps, encoder_hidden_states=text.to(dtype)).sample

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        use_training_weights(self.trainer.optimizers)
        if self.compile_unet and self._first_step_started is None:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log how long the first batch took when the UNet is compiled: compilation happens there."""
        if self.compile_unet and self._first_step_started is not None and self._first_step_started > 0:
            seconds = time.perf_counter() - self._first_step_started
            self._first_step_started = 0.0  # done
            log.info("torch.compile: the first training batch took %.1f s, compilation included", seconds)
            self.log("train/compile_seconds", seconds, rank_zero_only=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.compute_loss(batch)
        size = batch["latents"].shape[0]
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=size)
        if self._is_logging_step():
            self.log_dict(self._loss_by_timestep_bucket(terms), batch_size=size)
            if "dataset_index" in batch and self.dataset_names:
                self.log_dict(self._loss_by_dataset(terms, batch["dataset_index"]), batch_size=size)
        return terms.loss

    def _is_logging_step(self) -> bool:
        return (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0

    def _loss_by_timestep_bucket(self, terms: LossTerms) -> dict[str, torch.Tensor]:
        """Unweighted loss per ``timestep_buckets`` ranges of the schedule: ``train/loss_t000-249`` etc."""
        return loss_by_timestep_bucket(terms, self.noise_scheduler.config.num_train_timesteps, self.timestep_buckets)

    def _loss_by_dataset(self, terms: LossTerms, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted loss per dataset of ``data=mixed`` (``index`` ``(B,)``): ``train/loss_<name>``."""
        return loss_by_dataset(terms, index, self.dataset_names)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Unweighted loss at fixed timesteps and fixed noise, so runs compare (no caption dropout); also unmasked
        with ``masked_loss``: it measures the whole image, the same number with or without masks; with
        ``train_text_encoder`` the text is the training encoders' of the batch's token ids."""
        if self.train_text_encoder:
            batch = self.encode_token_ids(batch)
        loss = fixed_timestep_loss(
            self._predictor(batch, self.added_conditioning(batch)),
            self.noise_scheduler,
            batch["latents"].float(),
            batch["text"].float(),
            self.validation_timesteps,
            seed=batch_idx,
        )
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0], sync_dist=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, unless a callback skips it by raising :class:`SkipOptimizerStep` once the
        gradients are computed (``trainer.callbacks.finite_loss``): the weights and the optimizer state
        stay, the step counts, the next step clears the gradients."""
        with contextlib.suppress(SkipOptimizerStep):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        use_evaluation_weights(self.trainer.optimizers)  # for what follows the step (EMA, checkpoint, validation)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._is_logging_step():
            norm = gradient_norm(self.unet.parameters())
            if norm is not None:
                self.log("train/grad_norm", norm)

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip as configured; under bf16 autocast also with a fused optimizer.

        Lightning's AMP plugin refuses to clip for an optimizer that unscales gradients in its own
        step (fused AdamW), which matters only with a loss scaler (``16-mixed``); ``bf16-mixed`` has
        none, so the gradients are clipped here directly, as in ``32-true``.
        """
        precision = self.trainer.precision_plugin
        no_scaler = isinstance(precision, MixedPrecision) and precision.scaler is None
        if gradient_clip_val and no_scaler and getattr(optimizer, "defaults", {}).get("fused"):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        groups = parameter_groups(self.unet, self.trained_text_encoders(), self.param_group_settings)
        optimizer = self.optimizer_factory(params=groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilds the UNet and the scheduler without the training code."""
        record = checkpoint.setdefault(CHECKPOINT_KEY, {})
        record["unet_config"] = dict(self.unet.config)
        record["noise_scheduler_config"] = dict(self.noise_scheduler.config)
        if self.lora is not None:
            record["lora"] = self.lora.to_dict()
        if self.text_encoder is not None:
            record_adapters(record, self.text_encoder_lora, self.text_encoder_2_lora)


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a latent batch (for Lightning's ``ThroughputMonitor``)."""
    return batch["latents"].shape[0]
