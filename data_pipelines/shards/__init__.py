"""What raw and latent shards share: shard lists (folders, globs, brace patterns), the size-limited
tar writer, and the webdataset streaming pipelines with corrupt-sample counting.
"""
