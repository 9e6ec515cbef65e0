"""Logging set-up for raysd's command-line entry points.

Modules log through ``logging.getLogger(__name__)``; a CLI's ``main()`` calls :func:`setup_logging` once so
that their INFO lines reach the user as ``[raysd] ...``, on stderr or stdout as that CLI always printed them.
The handler looks up ``sys.stdout`` / ``sys.stderr`` when it writes, so a redirected or captured stream
(pytest's ``capsys``) receives the lines. Library use configures nothing: the application decides.
"""

from __future__ import annotations

import logging
import sys
from importlib.machinery import ModuleSpec
from typing import Literal

PREFIX = "[raysd] "


class _StdStreamHandler(logging.Handler):
    """Writes to whatever ``sys.<name>`` is at the time of the record."""

    def __init__(self, name: Literal["stdout", "stderr"], level: int = logging.NOTSET):
        super().__init__(level)
        self.stream_name = name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # never let a broken stream end a run
            self.handleError(record)


def setup_logging(level: int = logging.INFO, stream: Literal["stdout", "stderr"] = "stderr") -> logging.Logger:
    """Send the ``raysd`` loggers' records at ``level`` and above to ``stream`` as ``[raysd] message``.

    Calling it again replaces the handler it installed before (idempotent, e.g. several ``main()`` calls in
    one process). Returns the ``raysd`` logger.
    """
    logger = logging.getLogger("raysd")
    for h in list(logger.handlers):
        if isinstance(h, _StdStreamHandler):
            logger.removeHandler(h)
    handler = _StdStreamHandler(stream)
    handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def module_logger(name: str, spec: ModuleSpec | None) -> logging.Logger:
    """A module's logger, under ``raysd`` also when the module runs as ``python -m raysd.x``: its ``__name__``
    is then ``'__main__'``, outside the logger that :func:`setup_logging` configures. Call it as
    ``module_logger(__name__, __spec__)``."""
    return logging.getLogger(spec.name if spec is not None else name)
