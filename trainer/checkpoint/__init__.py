"""Our own training-checkpoint format and everything that reads or writes it: its keys, reading .ckpt
files and DeepSpeed folders (ZeRO shards consolidated), resume resolution, remote copies, and export
(a diffusers folder, or a single file through :mod:`trainer.interop`). Depends on no Lightning
module or callback.
"""
