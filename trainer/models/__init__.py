"""latentforge trainer.models."""
