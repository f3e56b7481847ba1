"""latentforge's Hydra configs, installed as the package ``latentforge_conf`` (``pkg://latentforge_conf``)."""
