"""Server logs: JSON lines whose tracebacks never carry a slide name."""

from __future__ import annotations

import json
import logging
import sys

from histohelper.errors import CorruptSlideError
from histohelper.server.app import JsonLogFormatter

SECRET = "/data/cohort1/TCGA-AB-1234-Smith_John.svs"


def _record_of_failure() -> logging.LogRecord:
    """A log record carrying a library error that quotes a slide name, wrapped in ours."""
    try:
        try:
            open(SECRET)  # noqa: SIM115 - raises FileNotFoundError quoting the name
        except OSError as exc:
            raise CorruptSlideError("a region of the slide could not be decoded") from exc
    except CorruptSlideError:
        return logging.makeLogRecord(
            {
                "name": "histohelper.server.servicer",
                "levelno": logging.ERROR,
                "levelname": "ERROR",
                "msg": "analysis crashed",
                "exc_info": sys.exc_info(),
                "request_id": "r-1",
            }
        )
    raise AssertionError("no exception was raised")


def test_tracebacks_withhold_foreign_messages_and_keep_frames() -> None:
    line = JsonLogFormatter().format(_record_of_failure())
    entry = json.loads(line)
    assert entry["request_id"] == "r-1" and entry["message"] == "analysis crashed"
    tb = entry["traceback"]
    assert "TCGA" not in line and "Smith" not in line
    assert "FileNotFoundError: <message withheld>" in tb
    assert "histohelper.errors.CorruptSlideError: a region of the slide could not be decoded" in tb
    assert "test_logging.py" in tb and "_record_of_failure" in tb
    assert tb.index("FileNotFoundError") < tb.index("CorruptSlideError")
