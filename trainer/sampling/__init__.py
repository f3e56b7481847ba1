"""The included sampler: txt2img and img2img from an export folder, with its own denoising loop."""
