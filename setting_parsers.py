"""Setting parsers: turn the text of one setting into its typed value, or say what was expected.

Each parser is a small object: calling it parses (raising ``ValueError(what is expected)``),
``values`` describes the accepted values for the README's settings table, and ``is_url``
marks values that may carry a password in their user-info part (masked wherever shown).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from tls import ca_bundle_problem


class Parser:
    """Turns the text of a setting into its value. ``values`` describes the accepted values (README)."""

    values = "text"
    is_url = False  # the value may carry a password in its user-info part

    def __call__(self, raw: str) -> Any:
        return raw.strip()


class IntRange(Parser):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.values = f"integer {low:,}–{high:,}"

    def __call__(self, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or not self.low <= value <= self.high:
            raise ValueError(f"an integer from {self.low} to {self.high}")
        return value


class FloatRange(Parser):
    def __init__(self, low: float, high: float, low_inclusive: bool = True) -> None:
        self.low, self.high, self.low_inclusive = low, high, low_inclusive
        if low_inclusive:
            self.expected, self.values = f"a number from {low:g} to {high:g}", f"number {low:g}–{high:g}"
        else:
            self.expected = f"a number greater than {low:g} and at most {high:g}"
            self.values = f"number > {low:g}, ≤ {high:g}"

    def __call__(self, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(self.expected) from None
        too_low = value < self.low or (not self.low_inclusive and value == self.low)
        if value != value or value > self.high or too_low:  # value != value: NaN
            raise ValueError(self.expected)
        return value


class Choice(Parser):
    def __init__(self, options: tuple[str, ...], upper: bool = False) -> None:
        self.options, self.upper = options, upper
        self.values = ", ".join(f"`{option}`" for option in options)

    def __call__(self, raw: str) -> str:
        value = raw.strip().upper() if self.upper else raw.strip().lower()
        if value not in self.options:
            raise ValueError("one of " + ", ".join(self.options))
        return value


class Boolean(Parser):
    values = "`true`, `false`"

    def __call__(self, raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError("true or false")


class Verbatim(Parser):
    """Kept exactly as written (a password may start or end with a space)."""

    def __call__(self, raw: str) -> str:
        return raw


class Host(Parser):
    values = "host name or IP"

    def __call__(self, raw: str) -> str:
        value = raw.strip()
        if not value or any(ch.isspace() for ch in value) or "/" in value:
            raise ValueError("a host name or IP address such as 192.168.0.10")
        return value


class HttpUrl(Parser):
    values = "http(s) URL"
    is_url = True

    def __call__(self, raw: str) -> str:
        value = raw.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a full URL such as http://192.168.0.10:8000 (http or https)")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("a URL with a port from 1 to 65535") from None
        return value


class PostgresUrl(Parser):
    values = "`postgresql://` URL"
    is_url = True

    def __call__(self, raw: str) -> str:
        value = raw.strip()
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("a URL such as postgresql://user:password@localhost:5432/dbname")
        # libpq rejects a % that does not start a two-digit hex escape, and %00.
        if re.search(r"%(?![0-9A-Fa-f]{2})|%00", value):
            raise ValueError("a URL whose % signs start two-digit hex escapes (write a % in a password as %25)")
        hosts = urlsplit(value).netloc.rpartition("@")[2]
        for host in hosts.split(","):  # libpq accepts several host[:port], comma-separated
            port = host.rpartition("]")[2] if host.startswith("[") else host
            port = port.rpartition(":")[2] if ":" in port else ""
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError("a URL whose port is a number from 1 to 65535, "
                                 "as in postgresql://user:password@localhost:5432/dbname")
        return value


class PemFile(Parser):
    """A PEM file of CA certificates that exists and loads (``~`` expanded; relative: to the current folder)."""

    values = "path to a PEM file"

    def __call__(self, raw: str) -> str:
        path = os.path.expanduser(raw.strip())
        problem = ca_bundle_problem(path)
        if problem:
            raise ValueError(f"a PEM file of CA certificates ({path} {problem})")
        return path
