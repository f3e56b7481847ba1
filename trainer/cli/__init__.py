"""latentforge trainer.cli."""
