"""Loading for training: the LightningDataModules that stream latent (or raw image) shards with a
resumable position, and the skipped-sample monitor (DreamBooth's data module, which prepares its
data with the models, is in :mod:`trainer.dreambooth.datamodule`).
"""
