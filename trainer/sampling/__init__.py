"""The included sampler: txt2img, img2img and inpainting from an export or a checkpoint, with our own loop."""
