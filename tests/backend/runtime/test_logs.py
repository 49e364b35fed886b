"""Credentials never reach a log line, whichever logger writes it and however it is passed."""

from __future__ import annotations

import logging

import pytest

from backend.runtime.logs import configure_logging, install_redaction, redact


@pytest.fixture
def redacting():
    """The redacting record factory for one test, then the previous factory again."""
    previous = logging.getLogRecordFactory()
    install_redaction()
    install_redaction()  # idempotent: one wrapper, not two
    yield
    logging.setLogRecordFactory(previous)


@pytest.mark.parametrize(
    ("line", "secret", "kept"),
    [
        ('http://s3:9000 "GET /b/x.png?X-Amz-Signature=abc123&X-Amz-Credential=AKID HTTP/1.1" 200', "abc123",
         '"GET /b/x.png?[redacted] HTTP/1.1" 200'),
        ("https://ls:pa55@label-studio:8080/api/tasks", "pa55", "https://[redacted]@label-studio:8080/api/tasks"),
        ("send: {'Authorization': 'Token 0123abcd', 'Accept': '*/*'}", "0123abcd",
         "'Authorization': 'Token [redacted]'"),
        ("Authorization: Basic bHM6cGFzcw==", "bHM6cGFzcw==", "Authorization: Basic [redacted]"),
        ('body {"refresh": "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"}', "eyJ0b2tlbl90",
         '"refresh": "[jwt]"'),
        ("login with password=hunter2 and api_key: k-999", "hunter2", "password=[redacted] and api_key: [redacted]"),
        ("X-Osprey-Webhook-Secret: 5ecre7", "5ecre7", "X-Osprey-Webhook-Secret: [redacted]"),
    ],
)  # fmt: skip
def test_redact_removes_the_secret_and_keeps_the_rest(line, secret, kept):
    cleaned = redact(line)
    assert secret not in cleaned and kept in cleaned


def test_plain_messages_are_left_alone():
    line = "GET /health 200 0.001s [abc123]; is it up? yes: 3 tokens of 32"
    assert redact(line) == line


def test_every_logger_and_level_is_cleaned_including_arguments_and_tracebacks(redacting, caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "http",
        "host",
        80,
        "GET",
        "/a.png?X-Amz-Signature=s1g",
        "HTTP/1.1",
        200,
        5,
    )
    try:
        raise ConnectionError("Max retries exceeded with url: /b.png?token=t0k")
    except ConnectionError:
        logging.getLogger("some.library").exception("fetch of %s failed", "http://u:pw@host/b.png")
    text = caplog.text
    assert "s1g" not in text and "t0k" not in text and "pw@" not in text
    assert "/a.png?[redacted]" in text and "ConnectionError" in text  # the traceback is kept, cleaned


def test_an_unknown_log_level_is_refused_by_name():
    with pytest.raises(ValueError, match="LOG_LEVEL='LOUD' is not a level"):
        configure_logging("LOUD")
