"""latentforge trainer.diffusion."""
