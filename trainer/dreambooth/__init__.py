"""DreamBooth (Ruiz et al. 2023): instance images of one subject, generated class images, prior preservation."""
