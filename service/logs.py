"""Log output of the service: plain lines or one JSON object per line, and the config logged once.

Standard library and service.config only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from service.config import Config, redacted

LOGGER = "streamtrain"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_HANDLER_TAG = "_streamtrain_handler"
_logged_configs: set[str] = set()


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-05-10T12:00:00.123Z``."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    # Underscored names are libraries' private attributes (Ray's record factory adds
    # `_ray_timestamp_ns`), not fields anyone passed.
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _RECORD_FIELDS and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, then the extras.

    An exception's traceback goes in ``exc``; extra values that JSON cannot hold are
    written as their ``str``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)  # an extra never hides one of the four fields
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <msg>`` followed by the extras as ``key=<json>``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        )
        extras = " ".join(
            f"{k}={json.dumps(v, default=str, ensure_ascii=False)}"
            for k, v in _extras(record).items()
        )
        text = f"{line} {extras}" if extras else line
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str = "INFO", json_lines: bool = False, stream: IO | None = None):
    """Send the root logger's records to ``stream`` (stderr) in the chosen format.

    Calling it again replaces the handler it installed before; handlers installed by
    others (pytest's, an embedding application's) are left alone.

    Args:
        level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL`` (any case),
            as ``log.level``.
        json_lines: one JSON object per line (``log.json``) instead of plain lines.
        stream: where lines go; ``sys.stderr`` by default.

    Returns:
        The handler installed.

    Raises:
        ValueError: an unknown level.
    """
    name = level.upper() if isinstance(level, str) else level
    if name not in _LEVELS:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}. Received: level={level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    setattr(handler, _HANDLER_TAG, True)
    root.addHandler(handler)
    root.setLevel(name)
    return handler


def log_config_once(cfg: Config, logger: logging.Logger | None = None) -> bool:
    """Log the resolved config, secrets redacted, as one INFO record (field ``config``).

    A process logs each distinct config once: a second call with the same config does
    nothing, so both the command and the service it starts may call this.

    Returns:
        True when the record was written.
    """
    data = redacted(cfg)
    key = json.dumps(data, sort_keys=True)
    if key in _logged_configs:
        return False
    _logged_configs.add(key)
    (logger or logging.getLogger(LOGGER)).info("resolved config", extra={"config": data})
    return True
