"""What every layer uses and that belongs to none: the error types, atomic writes (a crash never
leaves a half-written file or folder under its final name), the storage interface, log filters and
the contract record of the adapters over private upstream APIs (:mod:`lf_common.upstream_contract`;
the adapters themselves live beside their users). Only the standard library and fsspec are imported
here (``tests/unit/test_layers.py``).
"""
