"""Errors raised for bad input, each naming the file, key and expectation."""


class DataError(ValueError):
    """Input data that cannot be used as given (a missing path, an empty folder, a bad table)."""


class CorruptSampleError(DataError):
    """One sample inside a shard that cannot be decoded; the loaders skip and count these."""


class ConfigError(ValueError):
    """A composed config that cannot run as given (a combination of settings that does not train)."""


class StorageError(OSError):
    """A write that failed on the storage (a full disk, a failing device); names the path and the space needed."""
