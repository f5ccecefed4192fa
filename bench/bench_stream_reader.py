"""Benchmark: splitting a streamed body into lines, the old way against the linear one.

    python bench/bench_stream_reader.py [--max-old-mb 8]

Prints MB/s for:
  one long line   N MB without a newline, arriving in 8 KiB chunks (what a broken or hostile
                  server sends); the old reader (``buffer += chunk; buffer.split(b"\\n")``)
                  rescans the whole buffer per chunk, so its time grows with N squared
  SSE events      200,000 typical ``data: {...}`` lines of ~150 bytes (a long, normal answer)
and, through HTTP on loopback with the real client, the time and peak traced memory until a
16 MB line is refused (the 1 MiB line cap), and the time to drain 5,000 streamed events.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import config  # noqa: E402
from errors import BadResponseError  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from http_bodies import LineSplitter  # noqa: E402
from server_client import ServerClient  # noqa: E402

CHUNK = 8192
MB = 1024 * 1024


def old_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The reader this project used before: quadratic in a long line."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


def new_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    splitter = LineSplitter(max_line=1 << 40)  # no cap here: measure the splitting alone
    for chunk in chunks:
        yield from splitter.feed(chunk)
    rest = splitter.finish()
    if rest:
        yield rest


def chunked(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def rate(reader: Callable[[Iterable[bytes]], Iterator[bytes]], chunks: list[bytes], size: int) -> tuple[float, float]:
    started = time.perf_counter()
    for _ in reader(chunks):
        pass
    seconds = time.perf_counter() - started
    return seconds, size / MB / seconds


def long_lines(max_old_mb: int) -> None:
    print(f"one long line, {CHUNK // 1024} KiB chunks")
    print(f"  {'size':>7}  {'old':>22}  {'new':>22}  new/old")
    for megabytes in (1, 2, 4, 8, 16, 100):
        data = b"x" * (megabytes * MB)
        chunks = chunked(data)
        new_s, new_rate = rate(new_lines, chunks, len(data))
        if megabytes <= max_old_mb:
            old_s, old_rate = rate(old_lines, chunks, len(data))
            old_text, ratio = f"{old_s:8.3f} s {old_rate:8.1f} MB/s", f"{new_rate / old_rate:7.0f}x"
        else:
            old_text, ratio = f"{'(skipped)':>22}", ""
        print(f"  {megabytes:>4} MB  {old_text}  {new_s:8.3f} s {new_rate:8.1f} MB/s  {ratio}")


def sse_events() -> None:
    line = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":' \
           b'{"content":"\xed\x86\xa0\xed\x81\xb0 "},"finish_reason":null}]}\n\n'
    data = line * 100_000
    chunks = chunked(data)
    old_s, old_rate = rate(old_lines, chunks, len(data))
    new_s, new_rate = rate(new_lines, chunks, len(data))
    print(f"SSE events, {len(data) / MB:.1f} MB in {len(chunks):,} chunks")
    print(f"  old {old_s:.3f} s {old_rate:.1f} MB/s   new {new_s:.3f} s {new_rate:.1f} MB/s   new/old {new_rate / old_rate:.2f}x")


def through_http() -> None:
    settings = config.load_settings({"API_BASE_URL": "http://127.0.0.1:1", "API_PROTOCOL": "openai",
                                     "MAX_NEW_TOKENS": 100_000}, environ={})
    with FakeOpenAIServer(long_line=16 * MB) as srv:
        client = ServerClient(settings, srv.base_url)
        client.generate("warm up")
        tracemalloc.start()
        started = time.perf_counter()
        try:
            client.stream("x").text
        except BadResponseError as exc:
            outcome = exc.message[:60] + "..."
        else:
            outcome = "no error (unexpected)"
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        client.close()
    print(f"16 MB line through the client: refused after {seconds:.3f} s, peak traced memory {peak / MB:.1f} MB")
    print(f"  {outcome}")
    answer = " ".join(f"토큰{i}" for i in range(5000))
    with FakeOpenAIServer(answer=answer) as srv:
        client = ServerClient(settings, srv.base_url)
        client.generate("warm up")
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            assert len(list(client.stream("x"))) == 5000
            runs.append(time.perf_counter() - started)
        client.close()
    print(f"5,000 streamed events through the client: median {sorted(runs)[2]:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-old-mb", type=int, default=8, help="largest line to give the old reader (default 8)")
    args = parser.parse_args()
    long_lines(args.max_old_mb)
    sse_events()
    through_http()
    return 0


if __name__ == "__main__":
    sys.exit(main())
