"""Where raw image-caption pairs come from: each source yields :class:`SourceItem` in a fixed order."""

from data_pipelines.raw.sources.base import SourceItem

__all__ = ["SourceItem"]
