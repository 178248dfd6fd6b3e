"""Where llraid's log messages go: ``llraid: ...`` lines on standard error.

The array, the sync thread, the bitmap and the server log every state change md logs (arrays
assembled, members kicked or failed, syncs started, done and interrupted) on loggers under
``llraid``. The command line calls :func:`setup` once per run; it gives the ``llraid`` logger a
single handler, so each message appears once whatever else configures logging (nothing of
llraid configures the root logger).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "llraid: %(message)s"


class StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is when they are emitted (a live progress
    display and the tests replace it), or holds them while :attr:`held` is a list.

    (Not ``release``: that name is the handler lock's, which :meth:`handle` releases.)"""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)

    def hold(self) -> None:
        """Keep records back (until :meth:`replay` or :meth:`drop`)."""
        if self.held is None:
            self.held = []

    def replay(self) -> None:
        """Write the records held back, and from now on write as they come."""
        held, self.held = self.held or [], None
        for record in held:
            self.emit(record)

    def drop(self) -> None:
        """Forget the records held back (the command failed: its one error line says why)."""
        self.held = None


def setup(level: int = logging.INFO) -> StderrHandler:
    """Give the ``llraid`` logger its stderr handler (once) and return it."""
    logger = logging.getLogger("llraid")
    logger.setLevel(level)
    for h in logger.handlers:
        if isinstance(h, StderrHandler):
            return h
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    return handler
