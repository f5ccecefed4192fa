"""Setting parsers: turn the text of one setting into its typed value, or say what was expected.

Each parser is a small object: calling it parses (raising ``ValueError(what is expected)``),
``values`` describes the accepted values for the README's settings table, and ``is_url``
marks values that may carry a password in their user-info part (masked wherever shown).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any
from urllib.parse import urlsplit

from tls import ca_bundle_problem
from masking import mask_url_password
from server_spec import SpecProblem, parse_server_list, split_servers


class SettingProblem(ValueError):
    """A value's problem told as a whole sentence with its fix (``{name}`` stands for the variable),
    for problems that "NAME must be ..." cannot say well."""

    def describe(self, name: str) -> str:
        return str(self).replace("{name}", name)


class Parser:
    """Turns the text of a setting into its value. ``values`` describes the accepted values (README)."""

    values = "text"
    is_url = False  # the value may carry a password in its user-info part

    def __call__(self, raw: str) -> Any:
        return raw.strip()

    def urls(self, value: str) -> list[str]:
        """The URLs in a value of a URL setting (one, unless the setting is a list)."""
        return [value]

    def mask(self, value: str) -> str:
        """A URL setting's value with any password masked."""
        return mask_url_password(value)


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
    """A host name or IP address.

    ``port_setting`` names the setting a port written into it belongs in, ``url_setting`` the
    one a whole URL belongs in: both mistakes are answered with what to write instead.
    """

    values = "host name or IP"

    def __init__(self, port_setting: str | None = None, url_setting: str | None = None) -> None:
        self.port_setting = port_setting
        self.url_setting = url_setting

    def __call__(self, raw: str) -> str:
        value = raw.strip()
        if "://" in value and self.port_setting:
            self._url_instead(value)
        if not value or any(ch.isspace() for ch in value) or "/" in value:
            raise ValueError("a host name or IP address such as 192.168.0.10")
        # "192.168.0.10:8000" or "[fe80::1]:8000"; a bare IPv6 address has several colons.
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
        if match and self.port_setting:
            host, port = match.group(1) or match.group(3), match.group(2) or match.group(4)
            raise SettingProblem(f"{{name}}={value} has a port in it: write {{name}}={host} and "
                                 f"{self.port_setting}={port}")
        if ":" in value and self.port_setting and not _is_ipv6(value):  # it would make a URL that cannot be parsed
            host, _, after = value.partition(":")
            if value.count(":") == 1:
                raise SettingProblem(f"{{name}}={value}: {after!r} after the ':' is not a port number; write "
                                     f"{{name}}={host}, and the port as {self.port_setting}")
            raise ValueError("a host name or IP address such as 192.168.0.10 (an IPv6 address without brackets)")
        return value

    def _url_instead(self, value: str) -> None:
        """Raise SettingProblem for a URL written where a host belongs: the host (and port) to write."""
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname:
            raise ValueError("a host name or IP address such as 192.168.0.10")
        fix = f"write {{name}}={parts.hostname}" + (f" and {self.port_setting}={port}" if port else "")
        if self.url_setting:
            fix += f", or give the whole URL as {self.url_setting}={mask_url_password(value)}"
        raise SettingProblem(f"{{name}}={mask_url_password(value)} is a URL, not a host name or IP address: {fix}")


def _is_ipv6(value: str) -> bool:
    try:
        ipaddress.IPv6Address(value)  # a zone ("fe80::1%eth0") is accepted
    except ValueError:
        return False
    return True


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


class HttpUrlList(Parser):
    """One or more model server URLs, comma-separated, each with optional ``#key=value`` settings
    (:mod:`server_spec`). Kept as text; ``Settings.server_specs()`` gives the parsed servers."""

    values = "http(s) URLs, comma-separated"
    is_url = True

    def __call__(self, raw: str) -> str:
        items = split_servers(raw)
        if len(items) == 1:
            HttpUrl()(items[0].partition("#")[0])  # one malformed URL: the plain "must be a full URL"
        try:
            parse_server_list(raw)
        except SpecProblem as exc:
            raise SettingProblem("{name}: " + str(exc)) from None
        return ",".join(_normalised(item) for item in items)

    def urls(self, value: str) -> list[str]:
        return [item.partition("#")[0] for item in split_servers(value)]

    def mask(self, value: str) -> str:
        return ",".join(mask_url_password(item) for item in split_servers(value))


def _normalised(item: str) -> str:
    url, sep, fragment = item.partition("#")
    return url.strip().rstrip("/") + (sep + fragment.strip() if fragment.strip() else "")


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
        try:
            netloc = urlsplit(value).netloc
        except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed [
            raise ValueError(f"a valid URL ({exc}), such as postgresql://user:password@localhost:5432/dbname") from None
        hosts = netloc.rpartition("@")[2]
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
