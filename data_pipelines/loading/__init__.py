"""Loading for training: the LightningDataModules that stream latent (or raw image) shards with a
resumable position, DreamBooth's, and the skipped-sample monitor.
"""
