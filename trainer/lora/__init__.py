"""LoRA adapters (peft) on the UNet: adding them, and saving them in diffusers' and kohya's layouts."""
