"""What every layer uses and that belongs to none: the error types and atomic writes (a crash never
leaves a half-written file or folder under its final name).
"""
