"""What every layer uses and that belongs to none: the error types, atomic writes (a crash never
leaves a half-written file or folder under its final name) and, in :mod:`lf_common.upstream`, the
adapters of the private upstream APIs the project uses.
"""
