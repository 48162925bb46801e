"""MkDocs hooks of the documentation site.

The API reference renders the package's docstrings, which are written for ``help()`` and the source, not as
Markdown: a file-name pattern such as ``eval[-<data>]-<split>-k<k>[-n<examples>][-seed<seed>].json`` reads to
Markdown as a reference-style link whose target does not exist. On the generated reference pages (and there
only) such unresolved targets are reported at INFO instead of WARNING, so that ``mkdocs build --strict`` still
fails on every broken link of the written pages.
"""

from __future__ import annotations

import logging
import re

_ON_REFERENCE_PAGE = re.compile(r"(mkdocs_autorefs: )?reference/")


class _ReferenceBrackets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (record.levelno == logging.WARNING and _ON_REFERENCE_PAGE.match(message)
                and "Could not find cross-reference target" in message):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def on_config(config: object) -> object:
    # A logger's filters apply to the records it logs itself, not to its children's: filter each of autorefs'.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("mkdocs.plugins.mkdocs_autorefs"):
            logger = logging.getLogger(name)
            if not any(isinstance(existing, _ReferenceBrackets) for existing in logger.filters):
                logger.addFilter(_ReferenceBrackets())
    return config
