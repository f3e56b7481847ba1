"""latentforge trainer.callbacks."""
