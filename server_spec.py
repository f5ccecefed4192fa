"""Model server addresses as the user writes them: base URLs, comma-separated, with per-server settings.

    API_BASE_URL=http://192.168.0.10:8000,http://192.168.0.11:11434#slots=4&model=phi4:14b

Each server is a base URL, optionally followed by ``#`` and ``key=value`` settings joined by
``&``. The part after ``#`` is a URL fragment, which HTTP clients never send, and it is removed
here anyway: only the base URL reaches the server.

* ``slots=N``: how many generations the server runs at once (default: what the server says,
  else 1);
* ``model=NAME``: the model name for that server (default ``MODEL_NAME``);
* ``protocol=pc|ollama|openai``: skip detection for that server (default ``API_PROTOCOL``);
* ``ca=PATH``: a CA bundle (PEM) that signs that server's certificate.

Parsing is pure (no I/O) so that settings can be validated when they load; problems raise
:class:`SpecProblem` with the server named and the fix shown. :func:`checked_ca_bundle` looks for
the ``ca=`` file when the server is about to be used.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from errors import ConfigError
from masking import mask_url_password

MAX_SLOTS = 256
FRAGMENT_PROTOCOLS = ("pc", "ollama", "openai")
FRAGMENT_KEYS = ("slots", "model", "protocol", "ca")
FRAGMENT_SYNTAX = "slots=N, model=NAME, protocol=pc|ollama|openai, ca=PATH, joined by &"

# Paths of the servers' endpoints and pages (the ones the client calls itself, health checks, the
# pc server's API page): a URL ending in one is not a base URL. Longest first, so that
# /v1/chat/completions wins over /chat/completions and /api/health over /health.
ENDPOINT_PATHS = tuple(sorted((
    "/api/generate", "/api/chat", "/api/tags", "/api/version", "/api/health", "/api/show", "/api/ps",
    "/api/embed", "/api/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings",
    "/chat/completions", "/completions", "/completion", "/props", "/slots", "/openapi.json", "/health",
    "/metrics", "/docs", "/redoc",
), key=len, reverse=True))


class SpecProblem(ValueError):
    """A server address that cannot be used: the message is a whole sentence with the fix."""


@dataclass(frozen=True, repr=False)
class ServerSpec:
    """One configured model server.

    ``url`` is the base URL as written, without the fragment or a trailing ``/``; a password in
    it is kept (it is sent as HTTP basic auth) but :attr:`display` masks it.
    """

    url: str
    slots: int | None = None
    model: str | None = None
    protocol: str | None = None
    ca_bundle: str | None = None

    @property
    def display(self) -> str:
        """The URL fit to print or log: any password masked."""
        return mask_url_password(self.url)

    def __repr__(self) -> str:  # a spec ends up in tracebacks and debug logs: never with its password
        fields = ", ".join(f"{name}={value!r}" for name, value in (
            ("url", self.display), ("slots", self.slots), ("model", self.model), ("protocol", self.protocol),
            ("ca_bundle", self.ca_bundle)))
        return f"ServerSpec({fields})"

    def text(self) -> str:
        """The spec written back as a user would write it (fragment included, password masked)."""
        parts = [f"{key}={value}" for key, value in (("slots", self.slots), ("model", self.model),
                                                     ("protocol", self.protocol), ("ca", self.ca_bundle))
                 if value is not None]
        return self.display + ("#" + "&".join(parts) if parts else "")


def split_servers(text: str) -> list[str]:
    """The comma-separated items of a server list, stripped; empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_server_list(text: str) -> list[ServerSpec]:
    """Every server in a comma-separated list. Raises SpecProblem naming the server at fault."""
    items = split_servers(text)
    if not items:
        raise SpecProblem("no server URL was given: write one such as http://192.168.0.10:8000")
    specs: list[ServerSpec] = []
    seen: dict[str, ServerSpec] = {}
    for index, item in enumerate(items, 1):
        where = f" (server {index} of {len(items)})" if len(items) > 1 else ""
        spec = parse_server(item, where)
        key = spec.url.lower()
        if key in seen:
            raise SpecProblem(
                f"the server {spec.display} is listed twice: list each server once; to let it run more "
                f"generations at once, write {spec.display}#slots=N")
        seen[key] = spec
        specs.append(spec)
    return specs


def parse_server(text: str, where: str = "") -> ServerSpec:
    """One server: ``URL[#key=value&...]``. Raises SpecProblem naming the server and the fix."""
    url_part, _, fragment = text.strip().partition("#")
    url = url_part.strip().rstrip("/")
    _check_url(url, where)
    shown = mask_url_password(url)
    if "#" in fragment:
        raise SpecProblem(f"the server {shown}{where} has a second '#': the settings after the first are joined by "
                          f"'&', not by another '#': write {shown}#{fragment.replace('#', '&')}")
    settings = _parse_fragment(fragment, shown, where)
    return ServerSpec(url=url, **settings)


def _check_url(url: str, where: str) -> None:
    shown = mask_url_password(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SpecProblem(f"{shown!r}{where} needs a port from 1 to 65535, as in http://192.168.0.10:8000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecProblem(f"{shown!r}{where} is not a full URL: write one such as http://192.168.0.10:8000 "
                          "(http or https)")
    path = parts.path.rstrip("/")
    for endpoint in ENDPOINT_PATHS:
        if path.lower().endswith(endpoint):
            base = mask_url_password(urlunsplit((parts.scheme, parts.netloc, path[: len(path) - len(endpoint)], "", "")))
            raise SpecProblem(
                f"{shown}{where} is an endpoint ({endpoint}), not the server's base URL: use {base} "
                "(the client adds the endpoint paths itself)")
    if parts.query:
        raise SpecProblem(f"{shown}{where} has a query string (?{parts.query}): use the base URL alone, "
                          "such as http://192.168.0.10:8000")


def _parse_fragment(fragment: str, shown: str, where: str) -> dict[str, object]:
    """The per-server settings after ``#``, checked."""
    found: dict[str, object] = {}
    for item in fragment.split("&"):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, value = key.strip().lower(), unquote(raw.strip())
        if not sep or key not in FRAGMENT_KEYS:
            guess = difflib.get_close_matches(key, FRAGMENT_KEYS, 1)
            example = f"{guess[0]}={value or 'VALUE'}" if guess else "slots=4"
            raise SpecProblem(f"the server {shown}{where} has an unknown setting {item.strip()!r} after '#': "
                              f"write {shown}#{example} (settings after #: {FRAGMENT_SYNTAX})")
        field = "ca_bundle" if key == "ca" else key
        if field in found:
            raise SpecProblem(f"the server {shown}{where} sets {key} twice after '#': keep one")
        if not value:
            raise SpecProblem(f"the server {shown}{where} has an empty {key}= after '#': give a value or leave "
                              f"it out ({FRAGMENT_SYNTAX})")
        found[field] = _fragment_value(key, value, shown, where)
    return found


def _fragment_value(key: str, value: str, shown: str, where: str) -> object:
    if key == "slots":
        if not value.isdigit() or not 1 <= int(value) <= MAX_SLOTS:
            raise SpecProblem(f"the server {shown}{where} has slots={value}: slots must be a whole number from 1 "
                              f"to {MAX_SLOTS}, as in {shown}#slots=4")
        return int(value)
    if key == "protocol" and value.lower() not in FRAGMENT_PROTOCOLS:
        raise SpecProblem(f"the server {shown}{where} has protocol={value}: write one of "
                          f"{', '.join(FRAGMENT_PROTOCOLS)}, as in {shown}#protocol=ollama")
    return value.lower() if key == "protocol" else value


def describe_servers(specs: Sequence[ServerSpec]) -> str:
    """``http://a:8000, http://b:11434#slots=4`` (passwords masked) for messages and logs."""
    return ", ".join(spec.text() for spec in specs)


def checked_ca_bundle(spec: ServerSpec) -> str | None:
    """The server's ``#ca=`` file, which must exist (a missing one would fail every request later)."""
    if spec.ca_bundle is None:
        return None
    path = Path(spec.ca_bundle).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"The CA bundle {spec.ca_bundle} given for the model server {spec.display} (#ca=) does not exist.",
            hint=f"Fix: give the path of the PEM file of the CA that signed that server's certificate, as in "
            f"{spec.display}#ca=/path/to/ca.pem, or remove #ca= from API_BASE_URL / --api-url.",
        )
    return str(path)
