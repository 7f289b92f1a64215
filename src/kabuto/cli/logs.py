"""runc's ``--log`` and ``--log-format``: where the runtime's log lines go and how they look.

containerd and conmon read a runtime's last error from the file given with ``--log``, one line
per message, as runc writes them with logrus: ``time="..." level=error msg="..."`` (text) or
``{"level":"error","msg":"...","time":"..."}`` (json).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO

# logrus's level names
LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "fatal"}


def _rfc3339(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = LEVELS.get(record.levelno, "info")
        return f"time=\"{_rfc3339(record.created)}\" level={level} msg={json.dumps(record.getMessage())}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": LEVELS.get(record.levelno, "info"), "msg": record.getMessage(),
                           "time": _rfc3339(record.created)}, separators=(",", ":"))


class RuntimeLog:
    """The log as the global options set it up; ``error`` writes a failure where runc would."""

    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.stream: IO[str] = sys.stderr
        if path is not None:
            # runc appends (conmon hands every call of one container the same file)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.stream = os.fdopen(fd, "a", buffering=1)
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.WARNING)

    @property
    def plain(self) -> bool:
        """No log file and text lines: a person reads stderr."""
        return self.path is None and self.fmt == "text"

    def error(self, message: str) -> None:
        """Into the log; with a log file, also plainly on stderr, as runc does."""
        if self.plain:
            # no log file: a person is reading; the runtime's name says who speaks
            print(f"kabuto: {message}", file=sys.stderr)
            return
        logging.getLogger("kabuto").error(message)
        if self.path is not None:
            print(f"kabuto: {message}", file=sys.stderr)
