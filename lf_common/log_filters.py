"""Dropping known, pointless log lines of an upstream library (the rest of its logging untouched)."""

from __future__ import annotations

import logging


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of ``fragments``.

    Args:
        fragments: pieces of text that mark a record to drop.
    """

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop_log_messages(logger_name: str, *fragments: str) -> None:
    """Drop the messages of the logger ``logger_name`` (the one that emits them, not a parent: a
    logger's filters do not see its children's records) that contain one of ``fragments``.

    The logger need not exist yet: the filter is attached before the library is imported, and stays.
    Calling again with the same fragments adds nothing.
    """
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) and f.fragments == fragments for f in logger.filters):
        logger.addFilter(DropMessages(*fragments))
