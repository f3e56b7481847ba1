"""latentforge training: Lightning modules, diffusion math, callbacks, export, sampler, entry points."""
