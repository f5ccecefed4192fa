"""A password in a model server's URL, used from Python (no CLI masking in between): it is sent as
HTTP basic auth, and never appears in an error, a log record or a repr."""

from __future__ import annotations

import http.server
import logging
import threading
from typing import Iterator

import pytest
from fake_ollama_server import FakeOllamaServer
from fake_pc_server import FakePCServer
from fake_server_base import free_port
from model_clients import make_server, settings_for

import config
import model_api_client
from errors import PipelineError
from server_client import transport_options
from server_pool import ModelServerPool

SECRET = "Hunter2-Sentinel"
KEY = "sk-Sentinel-Key-0123456789"


def with_password(base_url: str) -> str:
    return base_url.replace("http://", f"http://bob:{SECRET}@")


def texts_of(error: PipelineError) -> list[str]:
    return [str(error), error.message, error.hint or "", error.url or ""]


def assert_no_secret(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in [*texts, *(record.getMessage() for record in caplog.records)]:
        assert SECRET not in text and KEY not in text, text


@pytest.fixture
def not_a_model_server() -> Iterator[str]:
    """An HTTP server on loopback that answers 404 to everything (a router page, another service)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_credentials_are_sent_as_basic_auth_and_the_answer_names_the_server_masked(caplog):
    caplog.set_level(logging.DEBUG)
    with FakePCServer() as srv:
        generation = make_server(with_password(srv.base_url)).generate("질문")
    assert srv.requests[-1].headers["Authorization"].startswith("Basic ")
    assert generation.stats.server == srv.base_url.replace("http://", "http://bob:***@")
    assert_no_secret(caplog)


def test_a_refused_connection_names_the_server_without_its_password(caplog):
    caplog.set_level(logging.DEBUG)
    url = with_password(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PipelineError) as info:
        make_server(url, API_PROTOCOL="pc").generate("질문")
    assert "bob:***@127.0.0.1" in info.value.message
    assert_no_secret(caplog, *texts_of(info.value))


def test_a_server_that_is_not_a_model_server_is_named_without_its_password(caplog, not_a_model_server):
    caplog.set_level(logging.DEBUG)
    client = make_server(with_password(not_a_model_server))
    with pytest.raises(PipelineError) as info:
        client.generate("질문")
    report = client.check_health()
    assert not report.ok and "bob:***@127.0.0.1" in (report.detail or "")
    assert_no_secret(caplog, *texts_of(info.value), report.detail or "", report.fix or "", repr(client))


def test_a_missing_model_is_named_without_the_servers_password(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOllamaServer(models=["llama3"]) as srv:
        with pytest.raises(PipelineError) as info:
            make_server(with_password(srv.base_url)).generate("질문")
    assert "llama3" in info.value.message
    assert_no_secret(caplog, *texts_of(info.value))


def test_check_server_health_logs_each_server_without_passwords(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    with FakePCServer() as ready:
        dead = with_password(f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("API_BASE_URL", f"{dead},{with_password(ready.base_url)}")
        monkeypatch.setenv("API_CONNECT_TIMEOUT", "1")
        monkeypatch.setenv("API_KEY", KEY)
        assert model_api_client.check_server_health() is True
    assert "bob:***@127.0.0.1" in caplog.text
    assert_no_secret(caplog)


def test_every_server_down_names_each_without_passwords(caplog):
    caplog.set_level(logging.DEBUG)
    urls = [with_password(f"http://127.0.0.1:{free_port()}") for _ in range(2)]
    pool = ModelServerPool(settings_for(",".join(urls), API_PROTOCOL="pc", API_MAX_ATTEMPTS=1), sleep=lambda s: None)
    with pool, pytest.raises(PipelineError) as info:
        pool.generate("질문")
    assert info.value.exit_code == 5 and info.value.message.count("bob:***@127.0.0.1") >= 2
    assert_no_secret(caplog, *texts_of(info.value))


def test_reprs_of_the_server_settings_hide_the_password_and_the_key():
    settings = config.load_settings({"API_BASE_URL": with_password("http://127.0.0.1:8000") + "#slots=2",
                                     "API_KEY": KEY}, environ={})
    spec = settings.server_specs()[0]
    for text in (repr(spec), str(spec), repr(transport_options(settings)), repr(settings)):
        assert SECRET not in text and KEY not in text, text
    assert "bob:***@127.0.0.1:8000" in repr(spec) and spec.url == with_password("http://127.0.0.1:8000")
