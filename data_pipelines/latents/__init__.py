"""Latent shards: their format (every key, dtype and shape; the manifest and cache key), the frozen
encoders, and precompute (raw shards -> latent shards).
"""
