"""latentforge trainer.modules."""
