"""http_transport and retry_policy against real HTTP servers on 127.0.0.1: retries (with a recorded
sleep, so no test waits through backoff), timeouts and deadlines, size caps, the line splitter,
proxies, one session per thread."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import (
    BadResponseError,
    InvalidPromptError,
    ModelConnectionError,
    ModelDisconnectedError,
    ModelServerError,
    ModelTimeoutError,
)
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER, BlackholeServer, free_port, split_pieces
from http_bodies import LineSplitter
from http_transport import HttpTransport, TransportOptions
from model_clients import Sleeps, drain, make_client, settings_for, timed
from retry_policy import RetryPolicy, backoff, retry_after
from server_client import ServerClient

PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


def in_backoff_range(delay: float, attempt: int) -> bool:
    full = min(0.5 * 2**attempt, 8.0)
    return 0.75 * full <= delay <= full


# --- connection failures: urllib3's Retry on the adapter, sleeping through our sleep ---


def test_refused_until_the_server_starts_then_succeeds():
    srv = FakePCServer(port=free_port())  # not listening yet: connections are refused
    sleeps = Sleeps(then=lambda count: srv.start() if count == 2 else None)  # it comes up during the 2nd pause
    try:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=4, sleep=sleeps)
        text, _ = client.generate("질문")
    finally:
        srv.stop()
    assert text == DEFAULT_ANSWER
    assert srv.generations == 1  # refused attempts never reached the server
    assert len(sleeps.calls) == 2
    assert in_backoff_range(sleeps.calls[0], 0) and in_backoff_range(sleeps.calls[1], 1)


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_answer_deadline_counts_from_the_attempt_that_got_through():
    clock = FakeClock()
    srv = FakePCServer(port=free_port())
    sleeps = Sleeps(then=lambda count: (clock.sleep(5.0), srv.start() if count == 2 else None))
    try:
        settings = settings_for(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=4, API_TIMEOUT=1)
        text = ServerClient(settings, sleep=sleeps, clock=clock).generate("질문").text
    finally:
        srv.stop()
    assert text == DEFAULT_ANSWER  # 10 s of refused attempts did not use up API_TIMEOUT=1


def test_down_server_fails_after_the_configured_attempts_without_waiting(caplog):
    caplog.set_level(logging.WARNING, logger="http_transport")
    port = free_port()  # nothing listening: refused at once
    sleeps = Sleeps()
    client = make_client(f"http://127.0.0.1:{port}", API_MAX_ATTEMPTS=3, API_PROTOCOL="pc", sleep=sleeps)
    error, elapsed = timed(client.generate, "질문")
    assert isinstance(error, ModelConnectionError) and not isinstance(error, ModelDisconnectedError)
    assert error.code == "CONNECTION_ERROR" and error.url == f"http://127.0.0.1:{port}/api/generate"
    assert len(sleeps.calls) == 2 and in_backoff_range(sleeps.calls[0], 0) and in_backoff_range(sleeps.calls[1], 1)
    assert elapsed < 1.0  # the backoff was recorded, not slept
    message = str(error)
    assert f"http://127.0.0.1:{port}" in message and "3 attempts" in message
    assert "PC_IP" in message and "firewall" in message and "running on the PC" in message
    assert "connection refused" in caplog.text and "retry 2" in caplog.text


def test_connect_timeout_is_retried_then_reported():
    sleeps = Sleeps()
    with BlackholeServer() as hole:
        client = make_client(hole.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=2, API_CONNECT_TIMEOUT=0.3,
                             sleep=sleeps)
        error, elapsed = timed(client.generate, "질문")
    assert isinstance(error, ModelConnectionError)
    assert "API_CONNECT_TIMEOUT=0.3s" in str(error) and "2 attempts" in str(error)
    assert len(sleeps.calls) == 1
    assert 0.5 <= elapsed < 5  # two connect timeouts of 0.3 s; generous above for a loaded machine


def test_dropped_generation_is_not_sent_again():
    with FakePCServer(drop=True) as srv:
        error, _ = timed(make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=3).generate, "질문")
    assert isinstance(error, ModelDisconnectedError)  # may have reached the model: a pool must not resend it
    assert error.code == "CONNECTION_ERROR" and error.exit_code == 5
    assert "closed the connection without answering" in str(error) and "may have reached it" in str(error)
    assert "It was not sent again" in error.hint  # the message alone stays true when a pool does resend it
    assert srv.generations == 1


# --- statuses: our policy ---


def test_503_then_200_is_retried_after_a_backoff():
    sleeps = Sleeps()
    with FakePCServer(fail_first=1, fail_status=503) as srv:
        text, _ = make_client(srv.base_url, API_PROTOCOL="pc", sleep=sleeps).generate("질문")
    assert text == DEFAULT_ANSWER
    assert srv.generations == 2
    assert len(sleeps.calls) == 1 and in_backoff_range(sleeps.calls[0], 0)


def test_503_every_time_gives_up_after_the_configured_attempts():
    with FakePCServer(fail_first=100, fail_status=503, fail_body={"detail": "서버가 바쁩니다"}) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=2)
        with pytest.raises(ModelServerError) as info:
            client.generate("질문")
    assert srv.generations == 2
    assert info.value.status == 503 and info.value.detail == "서버가 바쁩니다"
    assert "서버가 바쁩니다" in str(info.value) and "after 2 attempts" in str(info.value)


@pytest.mark.parametrize(
    "retry_after_value, cap, expected",
    [
        ("1", 60, 1.0),  # seconds, honoured
        ("30", 0.5, 0.5),  # capped by API_RETRY_AFTER_MAX
        (email.utils.formatdate(time.time() + 3600, usegmt=True), 0.5, 0.5),  # HTTP-date, capped
    ],
    ids=["seconds", "capped", "http-date"],
)
def test_429_retry_after_is_honoured_up_to_the_cap(retry_after_value, cap, expected):
    sleeps = Sleeps()
    with FakeOpenAIServer(fail_first=1, fail_status=429, retry_after=retry_after_value) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="openai", API_RETRY_AFTER_MAX=cap, sleep=sleeps)
        text, _ = client.generate("질문")
    assert text == DEFAULT_ANSWER
    assert srv.generations == 2
    assert sleeps.calls == [pytest.approx(expected)]


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_retried_once_after_a_pause(status):
    sleeps = Sleeps()
    with FakeOpenAIServer(fail_first=100, fail_status=status) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="openai", API_MAX_ATTEMPTS=5, sleep=sleeps)
        with pytest.raises(ModelServerError) as info:
            client.generate("질문")
    assert srv.generations == 2  # a 502/504 may hide a running generation: one duplicate at most
    assert info.value.status == status
    assert sleeps.calls == [3.0]  # the pause, longer than the first backoff


def test_gateway_error_then_success_and_retry_after_raises_the_pause():
    sleeps = Sleeps()
    with FakeOpenAIServer(fail_first=1, fail_status=502, retry_after="4") as srv:
        text, _ = make_client(srv.base_url, API_PROTOCOL="openai", sleep=sleeps).generate("질문")
    assert text == DEFAULT_ANSWER and srv.generations == 2
    assert sleeps.calls == [4.0]


@pytest.mark.parametrize("status", [429, 503])
def test_refusals_keep_the_full_attempt_budget(status):
    sleeps = Sleeps()
    with FakeOpenAIServer(fail_first=100, fail_status=status) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="openai", API_MAX_ATTEMPTS=5, sleep=sleeps)
        with pytest.raises(ModelServerError):
            client.generate("질문")
    assert srv.generations == 5
    assert [in_backoff_range(delay, n) for n, delay in enumerate(sleeps.calls)] == [True] * 4


@pytest.mark.parametrize(
    "status, body, error",
    [
        (400, {"detail": "프롬프트가 필요합니다"}, InvalidPromptError),
        (422, {"detail": [{"type": "missing", "loc": ["body", "prompt"], "msg": "Field required"}]}, InvalidPromptError),
        (404, {"detail": "Not Found"}, ModelServerError),
        (500, {"detail": "모델 실행 중 오류 발생"}, ModelServerError),
    ],
)
def test_client_and_server_errors_are_not_retried(status, body, error):
    sleeps = Sleeps()
    with FakePCServer(fail_first=100, fail_status=status, fail_body=body) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", sleep=sleeps)
        with pytest.raises(error) as info:
            client.generate("질문")
    assert srv.generations == 1 and sleeps.calls == []
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    if status == 400:
        assert "프롬프트가 필요합니다" in str(info.value)
    if status == 422:
        assert "prompt: Field required" in str(info.value)


def test_retry_policy_decisions():
    policy = RetryPolicy(max_attempts=3, retry_after_max=10, gateway_retry_pause=3)
    fixed = lambda: 0.0  # noqa: E731 - no jitter
    assert policy.wait(503, {}, 1, rand=fixed) == (0.5, "backoff")
    assert policy.wait(503, {}, 2, rand=fixed) == (1.0, "backoff")
    assert policy.wait(503, {}, 3, rand=fixed) is None  # the budget is spent
    assert policy.wait(429, {"Retry-After": "20"}, 1)[0] == 10  # capped
    assert policy.wait(429, {"retry-after-ms": "250"}, 1)[0] == 0.25
    assert policy.wait(502, {}, 1, gateway_retries=1) is None
    assert policy.wait(500, {}, 1) is None and policy.wait(404, {}, 1) is None
    assert policy.wait(503, {}, 1, statuses=frozenset()) is None
    assert backoff(10, rand=fixed) == 8.0 and 6.0 <= backoff(10) <= 8.0
    assert retry_after({"Retry-After": "soon"}) is None


# --- timeouts and deadlines ---


def test_read_timeout_is_not_retried_and_fails_near_the_timeout():
    with FakePCServer(delay=4) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_TIMEOUT=0.5)
        error, elapsed = timed(client.generate, "질문")
        assert isinstance(error, ModelTimeoutError)
        assert srv.generations == 1
    assert 0.45 <= elapsed < 2.5
    assert error.code == "TIMEOUT_ERROR"
    assert "API_TIMEOUT=0.5s" in str(error) and "raise API_TIMEOUT" in str(error)


def test_a_trickling_answer_fails_at_the_total_deadline():
    # One byte every 50 ms never trips the read timeout, and the whole answer would take ~15 s.
    with FakePCServer(trickle=0.05) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_TIMEOUT=0.5)
        error, elapsed = timed(client.generate, "질문")
        generations = srv.generations
    assert isinstance(error, ModelTimeoutError) and error.code == "TIMEOUT_ERROR"
    assert "still sending its answer when API_TIMEOUT=0.5s ran out" in str(error)
    assert error.partial_text == ""  # the partial body is discarded; the message says so
    assert "discarded" in str(error)
    assert 0.45 <= elapsed < 3.0
    assert generations == 1


def test_the_total_deadline_is_not_overrun_by_a_byte_sent_just_before_each_read_timeout():
    # A byte every 2 s against API_TIMEOUT=2.5: the read timeout never fires, and a deadline
    # checked only as bytes arrive would wait for the second byte (at 4 s): 1.6x the setting,
    # up to 2x. Each read now waits only as long as the deadline leaves: it stops at 2.5 s.
    with FakePCServer(trickle=2.0) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_TIMEOUT=2.5)
        error, elapsed = timed(client.generate, "질문")
    assert isinstance(error, ModelTimeoutError)
    assert "still sending its answer when API_TIMEOUT=2.5s ran out (1 byte had arrived" in str(error)
    assert elapsed < 10  # ~2.5 s; the byte count above is what tells the two behaviours apart


def test_a_stream_stops_at_its_total_limit_even_while_waiting_for_the_next_piece():
    # Pieces at 0, 2, 4 ... s; API_STREAM_MAX_SECONDS=3 ends the stream at 3 s, while it waits
    # for the third piece (checked only as pieces arrive, it ran to 4 s and took that piece too).
    with FakeOpenAIServer(answer="one two three four five", piece_delay=2.0) as srv:
        client = make_client(srv.base_url, API_TIMEOUT=2.5, API_STREAM_MAX_SECONDS=3)
        (pieces, _, error), elapsed = timed(drain, client.stream("질문"))
    assert isinstance(error, ModelTimeoutError) and "API_STREAM_MAX_SECONDS=3s" in str(error)
    assert pieces == ["one ", "two "] and error.partial_text == "one two "
    assert elapsed < 10


def test_a_stream_keeps_going_past_the_read_timeout_between_pieces():
    answer = "one two three four five six seven eight"
    with FakeOpenAIServer(answer=answer, piece_delay=0.1) as srv:
        (pieces, stats, error), elapsed = timed(drain, make_client(srv.base_url, API_TIMEOUT=0.4).stream("질문"))
    assert error is None and "".join(pieces) == answer
    assert elapsed > 0.4  # longer than the read timeout in total, yet no timeout: it is between pieces


def test_a_stream_longer_than_its_total_limit_fails_keeping_the_partial_answer():
    answer = " ".join(f"w{i}" for i in range(30))
    with FakeOpenAIServer(answer=answer, piece_delay=0.1) as srv:
        client = make_client(srv.base_url, API_TIMEOUT=5, API_STREAM_MAX_SECONDS=0.35)
        (pieces, stats, error), elapsed = timed(drain, client.stream("질문"))
    assert isinstance(error, ModelTimeoutError) and error.code == "TIMEOUT_ERROR"
    assert "API_STREAM_MAX_SECONDS=0.35s" in str(error)
    assert pieces and error.partial_text == "".join(pieces) and len(pieces) < 30
    assert error.stats is not None and error.stats.protocol == "openai"
    assert elapsed < 2.5


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_stream_silence_longer_than_the_read_timeout_is_a_timeout_with_partial_text(close_delimited):
    with FakeOllamaServer(answer="first second third", piece_delay=3, close_delimited=close_delimited) as srv:
        client = make_client(srv.base_url, API_TIMEOUT=0.3)
        (pieces, _, error), elapsed = timed(drain, client.stream("질문"))
    assert isinstance(error, ModelTimeoutError)
    assert "between two pieces" in str(error)
    assert error.partial_text == "first " == "".join(pieces)
    assert elapsed < 2.0


# --- size caps and the line splitter ---


@pytest.mark.parametrize("byte_chunks, how", [(False, "announced 2,"), (True, "went past API_MAX_RESPONSE_BYTES")],
                         ids=["content-length", "chunked"])
def test_a_body_over_the_size_cap_is_refused(byte_chunks, how):
    with FakeOllamaServer(answer="abc " * 700, byte_chunks=byte_chunks) as srv:
        client = make_client(srv.base_url, API_MAX_RESPONSE_BYTES=2048)
        with pytest.raises(BadResponseError) as info:
            client.generate("질문")
    assert how in str(info.value) and "API_MAX_RESPONSE_BYTES=2,048" in str(info.value)
    assert info.value.code == "BAD_RESPONSE"


def test_a_streamed_answer_over_the_size_cap_stops_keeping_what_arrived():
    with FakeOpenAIServer(answer="가나다 " * 2000) as srv:
        client = make_client(srv.base_url, API_MAX_RESPONSE_BYTES=4096)
        pieces, _, error = drain(client.stream("질문"))
    assert isinstance(error, BadResponseError) and "API_MAX_RESPONSE_BYTES=4,096" in str(error)
    assert error.partial_text.startswith("가나다 ") and 4096 < len(error.partial_text.encode()) < 4200
    assert "".join(pieces) == error.partial_text[: len("".join(pieces))]


def test_a_16_mb_line_without_a_newline_fails_fast_in_bounded_memory():
    with FakeOpenAIServer(long_line=16 * 1024 * 1024) as srv:
        client = make_client(srv.base_url)
        client.detect_protocol()
        tracemalloc.start()
        try:
            (pieces, _, error), elapsed = timed(drain, client.stream("질문"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert srv.wait_for_disconnect(timeout=5)
    assert isinstance(error, BadResponseError) and error.code == "BAD_RESPONSE"
    assert "more than 1,048,576 bytes without a newline" in str(error)
    assert pieces == [] and error.partial_text == ""
    assert elapsed < 5.0  # ~0.05 s here; the quadratic reader took 19 s on this machine
    assert peak < 8 * 1024 * 1024  # the cap (1 MiB) and a few buffers, not 16 MB


def test_line_splitter_joins_pieces_and_strips_line_endings():
    splitter = LineSplitter(max_line=100)
    chunks = [b"data: one\r", b"\ndata: t", b"w", b"o\n\ndata: \xea\xb0", b"\x80\n", b"tail"]
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    assert lines == [b"data: one", b"data: two", b"", "data: 가".encode()]
    assert splitter.finish() == b"tail"


def test_line_splitter_refuses_a_line_over_its_cap():
    splitter = LineSplitter(max_line=10, too_long=lambda size: BadResponseError(f"too long: {size}"))
    assert list(splitter.feed(b"short\n")) == [b"short"]
    with pytest.raises(BadResponseError, match="too long: 12"):
        list(splitter.feed(b"abcdefghijkl"))


def test_line_splitter_is_linear_in_a_long_line():
    splitter = LineSplitter(max_line=64 * 1024 * 1024)
    chunk = b"x" * 8192
    started = time.perf_counter()
    for _ in range(2048):  # 16 MB in 8 KiB chunks, no newline
        assert not list(splitter.feed(chunk))
    assert list(splitter.feed(b"\n")) == [b"x" * (16 * 1024 * 1024)]
    assert time.perf_counter() - started < 3.0  # ~0.03 s; rescanning the buffer per chunk takes ~20 s


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"a", b"\xea\xb0\x80", b"\n", b"\r", b"\r\n", b"data: "]), max_size=80)
       .map(b"".join), cuts=st.lists(st.integers(0, 400)), max_line=st.sampled_from([4, 10_000]))
def test_line_splitter_agrees_with_split_whatever_the_chunking(data, cuts, max_line):
    def strip(line: bytes) -> bytes:
        return line[:-1] if line.endswith(b"\r") else line

    *expected, last = [strip(line) for line in data.split(b"\n")]
    splitter = LineSplitter(max_line=max_line)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    try:
        lines = [line for a, b in zip(points, points[1:]) for line in splitter.feed(data[a:b])]
    except BadResponseError:  # refused only when some line really is longer than the cap
        assert any(len(line) > max_line for line in data.split(b"\n"))
        return
    assert lines == expected and splitter.finish() == last
    assert all(len(line) <= max_line for line in data.split(b"\n"))  # nothing too long got through


# --- proxies, sessions, threads ---


def test_environment_proxy_does_not_break_lan_calls(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    with FakePCServer() as srv:
        text, _ = make_client(srv.base_url).generate("질문")
        assert text == DEFAULT_ANSWER
        # The override really switches the environment's proxy on (and then it fails):
        with pytest.raises(ModelConnectionError, match="proxy"):
            make_client(srv.base_url, API_PROTOCOL="pc", API_USE_ENV_PROXY="true", API_MAX_ATTEMPTS=1).generate("질문")


def test_one_transport_serves_many_threads_each_with_its_own_connection():
    with FakeOpenAIServer(delay=0.2) as srv:
        transport = HttpTransport(srv.base_url, TransportOptions())
        body = {"model": "phi4", "messages": [{"role": "user", "content": "질문"}]}
        statuses: dict[str, list[int]] = {}

        def work(name: str) -> None:
            statuses[name] = [transport.post("/v1/chat/completions", body).status for _ in range(3)]

        threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        transport.close()
        posts = [r for r in srv.requests if r.method == "POST"]
    assert statuses == {f"t{i}": [200, 200, 200] for i in range(4)}
    assert srv.peak_generations >= 2  # the threads really ran at once
    assert len({r.client for r in posts}) == 4  # one keep-alive connection per thread


def test_a_closed_transport_opens_new_sessions_on_use():
    with FakePCServer() as srv:
        transport = HttpTransport(srv.base_url)
        assert transport.get("/api/health").json()["model_loaded"] is True
        transport.close()
        assert transport.get("/api/health").status == 200
        transport.close()
    assert [r.path for r in srv.requests] == ["/api/health", "/api/health"]
    assert len({r.client for r in srv.requests}) == 2  # closing dropped the keep-alive connection


def test_split_pieces_matches_what_the_fakes_send():
    assert "".join(split_pieces(DEFAULT_ANSWER)) == DEFAULT_ANSWER


# --- the prepared-request shortcut --------------------------------------------------------


def test_repeated_posts_carry_their_own_bodies_and_any_cookie_the_server_set():
    """The prepared request is reused per method and URL; bodies and lengths are each call's own,
    and once the server sets a cookie (a load balancer's sticky session) it is sent back."""
    import http.server
    import json as json_module

    seen: list[tuple[bytes, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            seen.append((self.rfile.read(int(self.headers["Content-Length"])), self.headers.get("Cookie")))
            body = b"{}"
            self.send_response(200)
            if len(seen) == 2:
                self.send_header("Set-Cookie", "route=pc2; Path=/")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with HttpTransport(f"http://127.0.0.1:{server.server_address[1]}") as transport:
            for text in ("한", "two", "three three"):
                assert transport.post("/api/generate", {"prompt": text}).status == 200
    finally:
        server.shutdown()
        server.server_close()
    assert [json_module.loads(body)["prompt"] for body, _ in seen] == ["한", "two", "three three"]
    assert [cookie for _, cookie in seen] == [None, None, "route=pc2"]


def test_a_redirected_post_is_followed_once_and_answered_once():
    """A proxy that moved the API (HTTP 307) gets the POST once, and its new place answers it."""
    import http.server

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            if self.path == "/api/generate":
                self.send_response(307)
                self.send_header("Location", "/moved/api/generate")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with HttpTransport(f"http://127.0.0.1:{server.server_address[1]}") as transport:
            reply = transport.post("/api/generate", {"prompt": "x"})
            assert reply.status == 200 and reply.json() == {"ok": True}
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/api/generate", "/moved/api/generate"]
