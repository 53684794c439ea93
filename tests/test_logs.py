"""Log lines: real logfmt (values quoted where they hold blanks) or JSON, one record a line."""

import io
import json
import logging

import pytest

from exporter.logs import setup_logging
from tests.logfmt import parse_lines, parse_logfmt


@pytest.fixture
def logger():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield logging.getLogger("exporter.test")
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def emit(logger, fmt, level="info"):
    stream = io.StringIO()
    setup_logging(level, fmt, stream)
    logger.info('collector %s failed: cannot read %s: "x=1" and a\ttab', "memcg", "/sys/fs/cgroup/memory stat",
                extra={"collector": "memcg"})
    logger.debug("not shown at info")
    logger.warning("plain")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.error("with a traceback", exc_info=True)
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_each_record_is_one_parseable_line(logger, fmt):
    text = emit(logger, fmt)
    records = parse_lines(text, fmt)
    assert len(records) == 3 == len(text.splitlines())
    first, plain, failed = records
    assert first["msg"] == 'collector memcg failed: cannot read /sys/fs/cgroup/memory stat: "x=1" and a\ttab'
    assert first["level"] == "INFO" and first["logger"] == "exporter.test" and first["collector"] == "memcg"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert plain["level"] == "WARN" and plain["msg"] == "plain"
    assert failed["level"] == "ERROR"
    assert "Traceback" in failed["exc"] and "boom\nsecond line" in failed["exc"]


def test_logfmt_quotes_only_what_needs_it(logger):
    text = emit(logger, "logfmt")
    line = text.splitlines()[1]
    assert line.split(" ", 1)[1] == "level=WARN logger=exporter.test msg=plain"
    assert 'msg="collector memcg failed: cannot read /sys/fs/cgroup/memory stat: \\"x=1\\" and a\\ttab"' in text
    assert parse_logfmt('a="" b=c') == {"a": "", "b": "c"}


def test_json_is_json(logger):
    text = emit(logger, "json")
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
