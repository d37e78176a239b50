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


def test_library_log_messages_are_withheld() -> None:
    """tifffile quotes the file it reads in its log messages: a library logger's text
    never reaches the log, its logger and level do; our own messages are kept."""
    record = logging.makeLogRecord(
        {
            "name": "tifffile",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "<tifffile.TiffFile %r> invalid tag",
            "args": ("TCGA-AB-1234-Smith_John.svs",),
        }
    )
    entry = json.loads(JsonLogFormatter().format(record))
    assert "Smith" not in json.dumps(entry)
    assert entry["logger"] == "tifffile" and entry["level"] == "WARNING"
    assert entry["message"] == "<library message withheld>"
    own = logging.makeLogRecord({"name": "histohelper.server.pipeline", "msg": "analysis ended"})
    assert json.loads(JsonLogFormatter().format(own))["message"] == "analysis ended"


def test_python_warnings_become_json_lines(capsys) -> None:
    """A library's warning (PIL's "Corrupt EXIF data" went to stderr as raw text) is a
    JSON line with its category and source, its text withheld; ours keep their text."""
    import warnings

    from histohelper.model_export.export import UntrainedModelWarning
    from histohelper.server.app import configure_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            configure_logging("INFO")
            warnings.warn(f"Corrupt EXIF data in {SECRET}", UserWarning, stacklevel=1)
            warnings.warn("weights are untrained", UntrainedModelWarning, stacklevel=1)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2 and "Smith" not in json.dumps(lines)
    lib, own = lines
    assert lib["logger"] == "py.warnings" and lib["warning"] == "UserWarning"
    assert lib["message"] == "<library message withheld>"
    assert lib["source"].startswith("test_logging.py:")
    assert own["logger"] == "py.warnings.histohelper"
    assert own["message"] == "UntrainedModelWarning: weights are untrained"


def test_lines_logged_during_a_call_carry_its_request_id() -> None:
    """The tiler knows no request ids; its lines get the id of the call on its thread."""
    from histohelper.server import audit

    record = logging.makeLogRecord(
        {"name": "histohelper.server.tiling.slide", "msg": "validation read failed"}
    )
    audit.set_current(audit.CallRecord(rpc="AnalyzeSlide", request_id="r-9"))
    try:
        assert json.loads(JsonLogFormatter().format(record))["request_id"] == "r-9"
        own = logging.makeLogRecord({"name": "histohelper.x", "msg": "m", "request_id": "r-1"})
        assert json.loads(JsonLogFormatter().format(own))["request_id"] == "r-1"
    finally:
        audit.set_current(None)
    assert "request_id" not in json.loads(JsonLogFormatter().format(record))
