"""The access log's lines (``minidasgi.accesslog``), without a server."""

from __future__ import annotations

import json
import logging

import pytest

from minidasgi.accesslog import AccessLog

COMMON = {"method": "GET", "key": "k", "node": "n", "status": 200, "queue_wait": 0.001}


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]


def test_text_marks_an_aborted_response(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    log = AccessLog("text")
    log.write(path="/whole", total=0.01, **COMMON)
    log.write(path="/cut", total=0.02, aborted=True, **COMMON)
    whole, cut = _lines(caplog)
    assert "aborted" not in whole and " status=200 " in whole
    assert cut.endswith(" aborted=true") and " status=200 " in cut


def test_json_says_whether_the_response_was_aborted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    log = AccessLog("json")
    log.write(path="/whole", total=0.01, **COMMON)
    log.write(path="/cut", total=0.02, aborted=True, **COMMON)
    whole, cut = map(json.loads, _lines(caplog))
    assert whole["status"] == 200 and whole["aborted"] is False
    assert cut["status"] == 200 and cut["aborted"] is True
