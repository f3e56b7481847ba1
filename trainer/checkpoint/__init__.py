"""The checkpoint format and everything that reads or writes it: its keys, reading .ckpt files and
DeepSpeed folders, resume resolution, export (diffusers folder, single file), import, and weight
layouts. Depends on no Lightning module or callback.
"""
