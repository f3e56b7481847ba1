"""The first stage: train or fine-tune a diffusers ``AutoencoderKL`` on raw images.

Loss (Rombach et al. 2022, sec. 3 and appendix G, without the adversarial and perceptual terms):
``L = |x - D(z)|_1 + kl_weight * KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.optim import Optimizer

from lf_common.errors import ConfigError
from trainer.modules.schedule_free import use_evaluation_weights, use_training_weights


class AutoencoderModule(L.LightningModule):
    """Reconstruction + KL training of an ``AutoencoderKL``.

    Args:
        vae: the autoencoder.
        optimizer: a partial taking the parameters.
        lr_scheduler: a partial taking the optimizer (stepped per optimizer step), or ``None``.
        kl_weight: weight of the KL term.
        reconstruction_loss: ``"l1"`` or ``"mse"``.

    A schedule-free optimizer (``optim=schedule_free_adamw``) is switched to its training weights before each batch
    and to its evaluation weights after each optimizer step (as the UNet's module does), so validation, checkpoints
    and exports hold the evaluation weights.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
    ) -> None:
        super().__init__()
        if reconstruction_loss not in ("l1", "mse"):
            raise ConfigError(f"reconstruction_loss={reconstruction_loss!r}: expected 'l1' or 'mse'")
        self.save_hyperparameters(ignore=["vae", "optimizer", "lr_scheduler"], logger=False)
        self.vae = vae
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.kl_weight = kl_weight
        self.reconstruction_loss = reconstruction_loss

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype of the VAE's weights now (bf16 under ``bf16-true`` and DeepSpeed's bf16 mode)."""
        return next(p.dtype for p in self.vae.parameters() if p.is_floating_point())

    def losses(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for images ``(B, 3, H, W)`` in [-1, 1]; the VAE's inputs follow its weights' dtype."""
        posterior = self.vae.encode(pixels.to(self.vae_dtype)).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        if self.reconstruction_loss == "l1":
            rec = F.l1_loss(reconstruction.float(), pixels.float())
        else:
            rec = F.mse_loss(reconstruction.float(), pixels.float())
        kl = posterior.kl().mean()
        return {"loss": rec + self.kl_weight * kl, "rec": rec, "kl": kl}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch["pixels"])
        size = batch["pixels"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        self.log_dict({"train/rec": terms["rec"], "train/kl": terms["kl"]}, batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch["pixels"])
        self.log("val/rec", terms["rec"], prog_bar=True, batch_size=batch["pixels"].shape[0], sync_dist=True)
        return terms["loss"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        use_training_weights(self.trainer.optimizers)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        use_evaluation_weights(self.trainer.optimizers)  # for what follows the step (checkpoint, validation)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.vae.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer=optimizer), "interval": "step"},
        }

    @torch.no_grad()
    def latent_std(self, batches: list[torch.Tensor]) -> float:
        """Standard deviation of the posterior modes over some image batches ``(B, 3, H, W)``."""
        modes = [self.vae.encode(b.to(self.device, self.vae_dtype)).latent_dist.mode().float() for b in batches]
        return float(torch.cat([m.flatten() for m in modes]).std())
