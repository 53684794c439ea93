"""A strict logfmt reader for tests (go-logfmt's grammar): key=value pairs split by
blanks, a value bare (no blank, '=' or '"') or double-quoted with backslash escapes."""

from __future__ import annotations

import json

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse_logfmt(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        eq = line.find("=", i)
        if eq < 0:
            raise ValueError(f"a key without '=' at {i}: {line[i:i + 40]!r}")
        key = line[i:eq]
        if not key or any(c in ' "' for c in key):
            raise ValueError(f"bad key {key!r}")
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            buf = []
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted value")
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    nxt = line[i + 1]
                    if nxt == "u":
                        buf.append(chr(int(line[i + 2:i + 6], 16)))
                        i += 6
                        continue
                    buf.append(_ESCAPES[nxt])
                    i += 2
                    continue
                buf.append(c)
                i += 1
            value = "".join(buf)
            if i < n and line[i] != " ":
                raise ValueError(f"text after a quoted value at {i}: {line[i:i + 40]!r}")
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            value = line[i:end]
            if "=" in value or '"' in value:
                raise ValueError(f"unquoted value with '=' or '\"': {value!r}")
            i = end
        if key in out:
            raise ValueError(f"key {key!r} twice")
        out[key] = value
    return out


def parse_lines(text: str, fmt: str) -> list[dict]:
    """Every line of a log as a record; raises on a line that is not one."""
    return [parse_logfmt(line) if fmt == "logfmt" else json.loads(line) for line in text.splitlines() if line]
