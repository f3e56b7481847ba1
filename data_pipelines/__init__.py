"""latentforge data pipelines: raw and latent WebDataset shards, precompute, streaming loaders."""
