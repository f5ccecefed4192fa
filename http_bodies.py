"""HTTP bodies as text: UTF-8 decoding, streamed lines, and excerpts for error messages.

Pure functions, no I/O; used by the transport (decoding, line splitting) and by the protocols
(the server's error detail, a short description of a body that is not the expected JSON).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from errors import BadResponseError

EXCERPT_CHARS = 200
DETAIL_CHARS = 300
MAX_LINE_BYTES = 1024 * 1024  # one SSE/NDJSON event; real ones are well under 10 KB


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """One line, at most ``limit`` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode(data: bytes) -> str:
    """UTF-8 whatever the Content-Type says (requests would guess ISO-8859-1 for text/*)."""
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


def looks_like_html(text: str, content_type: str) -> bool:
    start = text.lstrip()[:100].lower()
    return "html" in content_type.lower() or start.startswith(("<!doctype", "<html", "<head", "<body"))


def describe_body(text: str, content_type: str) -> str:
    """Describe a body that is not the expected JSON, with a short excerpt."""
    if not text.strip():
        return "an empty body"
    if looks_like_html(text, content_type):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        named = f" titled {shorten(title.group(1), 80)!r}" if title else ""
        return f"an HTML page{named}, not JSON: {shorten(text)!r}"
    return f"a body that is not valid JSON ({content_type or 'no Content-Type'}): {shorten(text)!r}"


def error_detail(body: Any) -> str | None:
    """The server's error text: FastAPI ``detail``, OpenAI/llama.cpp ``error.message``, Ollama ``error``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    detail = body.get("detail")
    if isinstance(detail, list):  # pydantic validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail:
        return str(detail)
    if body.get("message"):
        return str(body["message"])
    return None


class LineSplitter:
    """Bytes in, complete lines out, in linear time and bounded memory.

    Each chunk is split once, on its own; an unfinished line is kept as a list of pieces and
    joined once, when its newline arrives (``buffer += chunk; buffer.split(b"\\n")`` rescans
    the whole buffer per chunk: quadratic in a long line). A line longer than ``max_line``
    raises ``too_long(size)``. Lines are split as bytes: a ``\\n`` byte never occurs inside a
    UTF-8 sequence, so a character cut across chunks is whole again in its line.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES,
                 too_long: Callable[[int], BaseException] | None = None) -> None:
        self.max_line = max_line
        self._too_long = too_long or (lambda size: BadResponseError(
            f"A streamed line grew past {max_line:,} bytes without a newline ({size:,} bytes)."))
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines that ``chunk`` completes, without ``\n`` (nor a ``\r`` before it)."""
        if b"\n" not in chunk:  # more of an unfinished line
            if chunk:
                self._parts.append(chunk)
                self._size += len(chunk)
                if self._size > self.max_line:
                    raise self._too_long(self._size)
            return []
        pending = self._size
        lines = chunk.split(b"\n")  # only the new chunk is scanned, in C
        rest = lines.pop()
        if self._parts:
            self._parts.append(lines[0])
            lines[0] = b"".join(self._parts)
        self._parts, self._size = ([rest], len(rest)) if rest else ([], 0)
        if pending + len(chunk) > self.max_line:  # only then can a line be too long
            longest = max(self._size, *map(len, lines))
            if longest > self.max_line:
                raise self._too_long(longest)
        if b"\r" in chunk:
            return [line[:-1] if line.endswith(b"\r") else line for line in lines]
        if lines[0].endswith(b"\r"):  # a \r that ended the previous chunk
            lines[0] = lines[0][:-1]
        return lines

    def finish(self) -> bytes:
        """What is left after the last newline (a last line without one)."""
        rest = b"".join(self._parts)
        self._parts, self._size = [], 0
        return rest[:-1] if rest.endswith(b"\r") else rest
