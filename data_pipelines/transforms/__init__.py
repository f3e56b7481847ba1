"""Image transforms (resize, crop, pixels <-> images) and aspect-ratio buckets, shared by
precompute, the image loaders and the sampler.
"""
