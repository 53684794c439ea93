"""Log records as logfmt or JSON lines, one record a line, as Prometheus' own programs log
(promslog: ``--log.format logfmt|json``).

Keys: ``time`` (RFC 3339, UTC, milliseconds), ``level`` (DEBUG, INFO, WARN, ERROR),
``logger``, ``msg``, then any ``extra=`` fields a call gave (``collector=memcg``), then
``exc`` with a traceback. A logfmt value is quoted when it holds a blank, ``=``, ``"``,
a control character or nothing, with ``\\``, ``"`` and control characters escaped, so a
multi-line traceback stays one line a parser reads back whole.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def record_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    """The fields of one record, in the order they are written."""
    fields: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
        "level": LEVEL_NAMES.get(record.levelname, record.levelname),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, val in vars(record).items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in fields:
            fields[key] = val
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


def _logfmt_key(key: str) -> str:
    cleaned = "".join(c if c > " " and c not in '="' else "_" for c in key)
    return cleaned or "_"


def _needs_quotes(text: str) -> bool:
    return not text or any(c <= " " or c in '="' or c == "\x7f" for c in text)


def logfmt_value(val: Any) -> str:
    if val is None:
        text = "null"
    elif isinstance(val, bool):
        text = "true" if val else "false"
    else:
        text = str(val)
    if not _needs_quotes(text):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_logfmt_key(k)}={logfmt_value(v)}"
                        for k, v in record_fields(record, self).items())


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                  for k, v in record_fields(record, self).items()}
        return json.dumps(fields, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "logfmt", stream=None) -> logging.Handler:
    """One handler on the root logger writing ``fmt`` lines to ``stream`` (stderr)."""
    formatter = JSONFormatter() if fmt == "json" else LogfmtFormatter()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel({"warn": "WARNING"}.get(level, level.upper()))
    return handler
