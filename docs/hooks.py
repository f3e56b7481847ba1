"""mkdocs hook: the docstrings' Sphinx-style markup, shown plainly on the API pages.

The docstrings are Google style but name objects as Sphinx does (``:func:`name```) and end a line with
``::`` before a literal block; mkdocstrings renders them as Markdown, where the role stays as raw text
(":func:" before the code) and "::" stays doubled. This drops the role and the second colon.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const):(?=<code>)")
DOUBLE_COLON = re.compile(r"(?<!:)::(?=</p>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """The page's HTML with the Sphinx roles before inline code removed and ``::`` ending a paragraph as ``:``."""
    return DOUBLE_COLON.sub(":", ROLE.sub("", html))
