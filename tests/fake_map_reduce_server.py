"""Fake model servers whose answer depends on the prompt, for the --all-rows tests.

``reply(prompt) -> str`` computes each answer (default :func:`summarise`: a map prompt is
answered with the rows it names, a reduce prompt with the union of its answers' rows, so the
answers shrink as they are combined). ``echo=True`` answers a reduce prompt with that prompt
twice, whatever the answer length limit: a reduce that never shrinks. ``fail_from=N`` answers
the N-th generation request and every later one with ``fail_status`` (set it back to None to let
a rerun through). Every fault switch of ``fake_server_base`` still applies.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable

from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import _Handler, split_pieces

_current = threading.local()

MAP_NOTE = re.compile(
    r"\((?:Rows (?P<first>[\d,]+)–(?P<last>[\d,]+)|Row (?P<one>[\d,]+)) of [\d,]+[^:]*: one part of the data")
HEADING = re.compile(r"\[Answer \d+: (?:rows (?P<first>[\d,]+)–(?P<last>[\d,]+)|row (?P<one>[\d,]+)) of [\d,]+\]")
MARKER = re.compile(r"\br\d{6}\b")


def _span(match: re.Match[str]) -> tuple[int, int]:
    if match.group("one"):
        row = int(match.group("one").replace(",", ""))
        return row, row
    return int(match.group("first").replace(",", "")), int(match.group("last").replace(",", ""))


def summarise(prompt: str) -> str:
    """``PART 1-120 (120 markers)`` for a map prompt, ``SUM 1-2400`` for a reduce prompt, else a fixed text."""
    headings = [_span(m) for m in HEADING.finditer(prompt)]
    if headings:
        return f"SUM {min(h[0] for h in headings)}-{max(h[1] for h in headings)}"
    note = MAP_NOTE.search(prompt)
    if note:
        first, last = _span(note)
        return f"PART {first}-{last} ({len(MARKER.findall(prompt))} markers)"
    return "ONE ANSWER"


def is_reduce(prompt: str) -> bool:
    return bool(HEADING.search(prompt))


def is_map(prompt: str) -> bool:
    return bool(MAP_NOTE.search(prompt)) and not is_reduce(prompt)


class _PromptAware:
    """Answers from the prompt; fails from the N-th generation on. Mixed in before a fake server class."""

    generate_paths: tuple[str, ...]
    _lock: threading.Lock

    def __init__(self, *, reply: Callable[[str], str] | None = summarise, echo: bool = False,
                 fail_from: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.reply = reply
        self.echo = echo
        self.fail_from = fail_from
        self.generation_count = 0
        self.prompts: list[str] = []  # every generation prompt, in arrival order

    @staticmethod
    def prompt_of(body: Any) -> str:
        if not isinstance(body, dict):
            return ""
        if isinstance(body.get("prompt"), str):
            return body["prompt"]
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        return str(messages[-1].get("content", "")) if messages else ""

    def _handle(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if method == "POST" and path in self.generate_paths:
            prompt = self.prompt_of(body)
            with self._lock:
                self.generation_count += 1
                failing = self.fail_from is not None and self.generation_count >= self.fail_from
                if not failing:
                    self.prompts.append(prompt)
            if failing:
                h.generating = True
                self._send_failure(h)  # type: ignore[attr-defined]
                return
            _current.prompt = prompt
        super()._handle(h, method, path, body, raw)  # type: ignore[misc]

    def pieces(self, limit: int | None = None, body: Any = None) -> tuple[list[str], bool]:
        prompt = getattr(_current, "prompt", None)
        if self.echo and prompt is not None and is_reduce(prompt):
            return split_pieces(prompt + "\n" + prompt), False  # longer than its input, whatever the limit
        if self.reply is None or prompt is None:
            return super().pieces(limit, body)  # type: ignore[misc]
        pieces = split_pieces(self.reply(prompt))
        if limit is not None and 0 <= limit < len(pieces):
            return pieces[:limit], True
        return pieces, False

    def map_prompts(self) -> list[str]:
        with self._lock:
            return [p for p in self.prompts if is_map(p)]

    def reduce_prompts(self) -> list[str]:
        with self._lock:
            return [p for p in self.prompts if is_reduce(p)]


class MapReducePCServer(_PromptAware, FakePCServer):
    """The pc server (one generation at a time) answering from the prompt."""


class MapReduceOllamaServer(_PromptAware, FakeOllamaServer):
    """Ollama answering from the prompt (reports its own prompt token count)."""


class MapReduceOpenAIServer(_PromptAware, FakeOpenAIServer):
    """llama.cpp answering from the prompt; ``slots`` sets the capacity it reports."""
