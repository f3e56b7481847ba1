"""latentforge trainer.strategies."""
