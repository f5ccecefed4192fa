"""Settings: loaded once, validated, passed in.

Precedence, highest first: explicit overrides (the CLI's flags), the real
environment, a ``.env`` file (``./.env``, or the file named by ``ENV_FILE``),
then the defaults below. Nothing here runs at import time: call
:func:`load_settings` and pass the result to the code that needs it.

``Config`` keeps the plan's class-level API (``Config.get_api_url()``,
``Config.get_db_connection_string()``, ``Config.API_PORT`` ...) for users'
scripts; it loads settings lazily on first use.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values

from errors import ConfigError

PROTOCOLS = ("auto", "pc", "ollama", "openai")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Values of the shared guide's example .env that cannot work until edited.
_PLACEHOLDER_VALUES = {"your_database", "your_user", "your_password", "your_api_key"}
_PLACEHOLDER_PATTERN = re.compile(r"(XXX|YYY|<[^>]*>)", re.IGNORECASE)


def is_placeholder(value: str | None) -> bool:
    """True for a value left as in the guide's example (``192.168.0.XXX``, ``your_user``)."""
    if not value:
        return False
    return value.strip().lower() in _PLACEHOLDER_VALUES or bool(_PLACEHOLDER_PATTERN.search(value))


# --- value parsers: each returns the parsed value or raises ValueError(expected) ---


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return parse


def _float_range(low: float, high: float, low_inclusive: bool = True) -> Callable[[str], float]:
    if low_inclusive:
        expected = f"a number from {low:g} to {high:g}"
    else:
        expected = f"a number greater than {low:g} and at most {high:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value != value or value > high or value < low or (not low_inclusive and value == low):
            raise ValueError(expected)
        return value

    return parse


def _choice(options: tuple[str, ...], lower: bool = True) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower() if lower else raw.strip().upper()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _text(raw: str) -> str:
    return raw.strip()


def _http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a full URL such as http://192.168.0.10:8000 (http or https)")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("a URL with a port from 1 to 65535") from None
    return value


def _postgres_url(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("a URL such as postgresql://user:password@localhost:5432/dbname")
    return value


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() for ch in value) or "/" in value:
        raise ValueError("a host name or IP address such as 192.168.0.10")
    return value


@dataclass(frozen=True)
class _Var:
    name: str
    field: str
    default: str | None
    parse: Callable[[str], Any]
    secret: bool = False


# Every setting, in .env.example order. Defaults are strings, parsed like any value.
VARIABLES: tuple[_Var, ...] = (
    # Model server (PC)
    _Var("PC_IP", "pc_ip", None, _host),
    _Var("API_PORT", "api_port", "8000", _int_range(1, 65535)),
    _Var("API_BASE_URL", "api_base_url_setting", None, _http_url),
    _Var("API_PROTOCOL", "api_protocol", "auto", _choice(PROTOCOLS)),
    _Var("MODEL_NAME", "model_name", "phi4", _text),
    _Var("API_KEY", "api_key", None, _text, secret=True),
    _Var("API_TIMEOUT", "api_timeout", "300", _float_range(0, 86400, low_inclusive=False)),
    _Var("API_CONNECT_TIMEOUT", "api_connect_timeout", "5", _float_range(0, 600, low_inclusive=False)),
    _Var("API_HEALTH_TIMEOUT", "api_health_timeout", "5", _float_range(0, 600, low_inclusive=False)),
    _Var("API_MAX_ATTEMPTS", "api_max_attempts", "3", _int_range(1, 20)),
    _Var("API_RETRY_AFTER_MAX", "api_retry_after_max", "60", _float_range(0, 3600)),
    _Var("API_USE_ENV_PROXY", "api_use_env_proxy", "false", _bool),
    # Answer limits: the size the client accepts, and an optional total time for a stream
    _Var("API_MAX_RESPONSE_BYTES", "api_max_response_bytes", "16777216", _int_range(1024, 2**40)),
    _Var("API_STREAM_MAX_SECONDS", "api_stream_max_seconds", "0", _float_range(0, 86400)),
    _Var("MODEL_CONTEXT_TOKENS", "model_context_tokens", "16384", _int_range(256, 10_000_000)),
    _Var("MAX_NEW_TOKENS", "max_new_tokens", "512", _int_range(1, 1_000_000)),
    _Var("TEMPERATURE", "temperature", "0.7", _float_range(0, 2)),
    _Var("MODEL_TYPE", "model_type", "phi4-quantized", _text),
    # PC-only (kept so one .env layout serves both machines)
    _Var("API_HOST", "api_host", "0.0.0.0", _host),
    _Var("MODEL_DIR", "model_dir", None, _text),
    _Var("LAPTOP_IP", "laptop_ip", None, _host),
    # Database
    _Var("DATABASE_URL", "database_url", None, _postgres_url, secret=True),
    _Var("DB_HOST", "db_host", "localhost", _host),
    _Var("DB_PORT", "db_port", "5432", _int_range(1, 65535)),
    _Var("DB_NAME", "db_name", None, _text),
    _Var("DB_USER", "db_user", None, _text),
    _Var("DB_PASSWORD", "db_password", None, lambda raw: raw, secret=True),
    _Var("DB_CONNECT_TIMEOUT", "db_connect_timeout", "5", _int_range(1, 600)),
    _Var("DB_CONNECT_RETRIES", "db_connect_retries", "3", _int_range(0, 20)),
    _Var("DB_STATEMENT_TIMEOUT", "db_statement_timeout", "60", _float_range(0, 86400)),
    _Var("DB_POOL_SIZE", "db_pool_size", "2", _int_range(1, 50)),
    # Logging
    _Var("LOG_FILE", "log_file", "laptop_client.log", _text),
    _Var("LOG_LEVEL", "log_level", "INFO", _choice(LOG_LEVELS, lower=False)),
)

_BY_NAME = {var.name: var for var in VARIABLES}
SECRET_NAMES = frozenset(var.name for var in VARIABLES if var.secret)


_URL_USERINFO_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
_KEY_VALUE_SECRET = re.compile(r"(?i)\b(password|api_key|authorization)(\s*[=:]\s*)(bearer\s+)?\S+")


def mask_secrets(text: str, secrets: Sequence[str] = ()) -> str:
    """Hide known secret values, URL passwords (``://u:pw@``) and ``password=...`` in text.

    The one masker for logs, error messages and everything the CLI prints.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_USERINFO_PASSWORD.sub(r"\1***@", text)
    return _KEY_VALUE_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


def mask_url_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


@dataclass(frozen=True, repr=False)
class Settings:
    """Validated settings. Secrets never appear in ``repr``."""

    pc_ip: str | None
    api_port: int
    api_base_url_setting: str | None
    api_protocol: str
    model_name: str
    api_key: str | None
    api_timeout: float
    api_connect_timeout: float
    api_health_timeout: float
    api_max_attempts: int
    api_retry_after_max: float
    api_use_env_proxy: bool
    api_max_response_bytes: int
    api_stream_max_seconds: float
    model_context_tokens: int
    max_new_tokens: int
    temperature: float
    model_type: str
    api_host: str
    model_dir: str | None
    laptop_ip: str | None
    database_url: str | None
    db_host: str
    db_port: int
    db_name: str | None
    db_user: str | None
    db_password: str | None
    db_connect_timeout: int
    db_connect_retries: int
    db_statement_timeout: float
    db_pool_size: int
    log_file: str
    log_level: str
    env_file: str | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        shown = (f"{var.field}={_masked(var, getattr(self, var.field))!r}" for var in VARIABLES)
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def source_of(self, name: str) -> str:
        """Where a variable's value came from: 'flag', 'environment', the .env path or 'default'."""
        return self.sources.get(name, "default")

    def api_base_url(self) -> str:
        """The model server's base URL: ``API_BASE_URL`` or ``http://{PC_IP}:{API_PORT}``.

        Raises ConfigError when neither is configured or ``PC_IP`` is still a placeholder.
        """
        if self.api_base_url_setting:
            if is_placeholder(self.api_base_url_setting):
                raise _not_configured("API_BASE_URL", self.api_base_url_setting, self)
            return self.api_base_url_setting
        if not self.pc_ip:
            raise ConfigError(
                "The model server is not configured yet: PC_IP is not set.",
                hint="Fix: set PC_IP (the PC's LAN address, e.g. 192.168.0.10) or API_BASE_URL "
                "in .env, or pass --api-url http://HOST:PORT.",
            )
        if is_placeholder(self.pc_ip):
            raise _not_configured("PC_IP", self.pc_ip, self)
        host = self.pc_ip
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.api_port}"

    def db_display(self) -> str:
        """``user@host:port/dbname`` for messages; never the password."""
        if self.database_url:
            parts = urlsplit(self.database_url)
            user = parts.username or "(default user)"
            host = parts.hostname or "(local socket)"
            port = parts.port or 5432
            name = parts.path.lstrip("/") or "(default database)"
            return f"{user}@{host}:{port}/{name}"
        user = self.db_user or "(default user)"
        name = self.db_name or "(default database)"
        return f"{user}@{self.db_host}:{self.db_port}/{name}"

    def db_connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg2.connect`` (connection target only).

        Raises ConfigError when a DB_* value is still the guide's placeholder.
        """
        if self.database_url:
            return {"dsn": self.database_url}
        for name in ("DB_NAME", "DB_USER", "DB_PASSWORD", "DB_HOST"):
            value = getattr(self, _BY_NAME[name].field)
            if is_placeholder(value):
                raise _not_configured(name, "***" if name == "DB_PASSWORD" else value, self)
        kwargs: dict[str, Any] = {"host": self.db_host, "port": self.db_port}
        if self.db_name:
            kwargs["dbname"] = self.db_name
        if self.db_user:
            kwargs["user"] = self.db_user
        if self.db_password:
            kwargs["password"] = self.db_password
        return kwargs

    def db_connection_string(self) -> str:
        """``postgresql://user:password@host:port/dbname`` with the password URL-escaped."""
        if self.database_url:
            return self.database_url
        user = quote(self.db_user or "", safe="")
        password = quote(self.db_password or "", safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = f"[{self.db_host}]" if ":" in self.db_host else self.db_host
        return f"postgresql://{auth}{host}:{self.db_port}/{quote(self.db_name or '', safe='')}"

    def secrets(self) -> list[str]:
        """Secret values present in these settings, for masking (see :func:`mask_secrets`)."""
        found = [v for v in (self.db_password, self.api_key) if v]
        for url in (self.database_url, self.api_base_url_setting):
            password = urlsplit(url).password if url else None
            if password:
                found.append(password)
        return found


def _not_configured(name: str, value: str, settings: Settings) -> ConfigError:
    where = settings.source_of(name)
    place = {"flag": "on the command line", "environment": "in the environment"}.get(where, f"in {where}")
    if where == "default":
        place = "in .env"
    return ConfigError(
        f"{name} is not configured yet: it is still the example value {value!r}.",
        hint=f"Fix: set {name} {place} to your real value (see .env.example).",
    )


def _read_env_file(path: Path) -> dict[str, str | None]:
    try:
        return dict(dotenv_values(path, encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Cannot read {path}: it is not UTF-8 ({exc.reason}).",
            hint="Fix: save the file as UTF-8.",
        ) from None
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror}.", hint="Fix: check the file's permissions.") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build validated settings.

    Args:
        overrides: explicit values by variable name (``{"API_PORT": 9000}``); None values are ignored.
        environ: the environment to read (default ``os.environ``).
        env_file: the .env file; default ``ENV_FILE`` from overrides/environment, else ``./.env``
            if it exists. An explicitly named file that does not exist is an error.

    Raises:
        ConfigError: listing every bad value, its variable, where it came from and what is expected.
    """
    environ = os.environ if environ is None else environ
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(_BY_NAME) - {"ENV_FILE"})
    if unknown:
        raise ConfigError(f"Unknown setting(s): {', '.join(unknown)}.")

    explicit_file = env_file or given.get("ENV_FILE") or environ.get("ENV_FILE") or None
    if explicit_file:
        path = Path(explicit_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"The env file {path} does not exist.",
                hint="Fix: check the path given by --env-file or ENV_FILE, or create it: cp .env.example .env",
            )
        file_values = _read_env_file(path)
    else:
        path = Path(".env")
        file_values = _read_env_file(path) if path.is_file() else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for var in VARIABLES:
        raw: Any = None
        source = "default"
        for candidate, where in (
            (given.get(var.name), "flag"),
            (environ.get(var.name), "environment"),
            (file_values.get(var.name), str(path)),
        ):
            if candidate is not None and str(candidate).strip() != "":
                raw, source = candidate, where
                break
        if raw is None:
            raw = var.default
        if raw is None:
            values[var.field] = None
            continue
        if not isinstance(raw, str):
            raw = str(raw)
        try:
            values[var.field] = var.parse(raw)
        except ValueError as exc:
            shown = "***" if var.secret else raw
            problems.append(f"{var.name} must be {exc}, got {shown!r} (from {source})")
            values[var.field] = None
        sources[var.name] = source

    if problems:
        raise ConfigError(
            "Invalid settings:\n  " + "\n  ".join(problems),
            hint="Fix: correct the value in .env (or the environment variable / flag named above); "
            "see .env.example for every setting.",
        )
    return Settings(**values, env_file=str(path) if file_values or explicit_file else None, sources=sources)


def _masked(var: _Var, value: Any) -> Any:
    """A setting's value fit to show: secrets as ``***`` (a URL keeps all but its password)."""
    if var.secret and value:
        return mask_url_password(value) if var.name == "DATABASE_URL" else "***"
    return value


def describe_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """(name, shown value, source) for every variable, secrets masked: for users' scripts and debugging."""
    rows = []
    for var in VARIABLES:
        value = getattr(settings, var.field)
        shown = "(not set)" if value is None else str(_masked(var, value))
        rows.append((var.name, shown, settings.source_of(var.name)))
    return rows


# --- the plan's class-level API, loaded lazily ---

_cached: Settings | None = None


def get_settings(reload: bool = False) -> Settings:
    """Settings from the environment and .env, loaded once per process."""
    global _cached
    if _cached is None or reload:
        _cached = load_settings()
    return _cached


class _ConfigMeta(type):
    def __getattr__(cls, name: str) -> Any:
        var = _BY_NAME.get(name)
        if var is None:
            raise AttributeError(name)
        return getattr(get_settings(), var.field)


class Config(metaclass=_ConfigMeta):
    """The plan's API: ``Config.API_PORT``, ``Config.get_api_url()``, ``Config.get_db_connection_string()``."""

    @classmethod
    def get_api_url(cls) -> str:
        return get_settings().api_base_url()

    @classmethod
    def get_db_connection_string(cls) -> str:
        return get_settings().db_connection_string()

    @classmethod
    def reload(cls) -> Settings:
        return get_settings(reload=True)
