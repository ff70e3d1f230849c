"""Log lines no value can forge (issue 11): service.log_format, as the gateway's uvicorn log
config (service.cli._log_config) and the worker (configure_root) install it."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from service.cli import _log_config
from service.log_format import JsonFormatter, TextFormatter, configure_root, escape

FORGED = "ds_x\n2030-01-01 INFO service.audit: key created\r\u2028\u202e"


def _gateway_lines(log_format: str, emit: object) -> list[str]:
    """Install the gateway's log config, send its stderr handler into a buffer, emit."""
    config = _log_config(log_format)  # type: ignore[arg-type]
    logging.config.dictConfig(config)
    stream = io.StringIO()
    handler = logging.getLogger("service").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        emit()  # type: ignore[operator]
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    return stream.getvalue().splitlines()


def test_the_gateway_writes_one_json_object_per_record() -> None:
    log = logging.getLogger("service.audit")

    def emit() -> None:
        log.info("dataset %s created", FORGED)
        try:
            raise ValueError("boom\nINFO fake")
        except ValueError:
            log.exception("failed on %s", FORGED)

    lines = _gateway_lines("json", emit)
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == f"dataset {FORGED} created"
    assert (first["level"], first["logger"]) == ("INFO", "service.audit")
    assert second["level"] == "ERROR" and "ValueError: boom\nINFO fake" in second["exception"]


def test_the_text_format_escapes_control_characters_and_indents_tracebacks() -> None:
    log = logging.getLogger("service.audit")

    def emit() -> None:
        log.warning("dataset %s created", FORGED)
        try:
            raise ValueError("boom\nINFO fake")
        except ValueError:
            log.exception("failed")

    lines = _gateway_lines("text", emit)
    assert lines[0].endswith(
        "WARNING service.audit: dataset ds_x\\n2030-01-01 INFO service.audit: key created"
        "\\r\\u2028\\u202e created"
    )
    assert lines[1].endswith("ERROR service.audit: failed")
    # Every further line belongs to the traceback: indented, so none reads as a record.
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[2:]), lines


def test_uvicorn_access_records_carry_their_fields() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v1/datasets?x=\n", "1.1", 201), None,
    )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/v1/datasets?x=\n", 201)
    assert "\n" not in JsonFormatter().format(record)


def test_the_worker_root_logger_writes_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_root("json")
        logging.getLogger("worker.tasks").warning("dropped %r", FORGED)
        err = capsys.readouterr().err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
    assert len(err.splitlines()) == 1 and json.loads(err)["logger"] == "worker.tasks"


def test_escape_leaves_ordinary_text_alone() -> None:
    assert escape("chats et chiens: 猫 🐈") == "chats et chiens: 猫 🐈"
    assert escape("a\tb\x00c") == "a\\tb\\x00c"
    assert isinstance(TextFormatter(), logging.Formatter)
