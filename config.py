"""Settings: declared once, loaded on demand, validated, passed in.

Each setting is declared exactly once, as a field of :class:`Settings` built with
:func:`setting` (environment variable, default, parser with its range, secret or
not, a one-line doc). That declaration drives parsing and validation
(:func:`load_settings`), masking (``repr``, :func:`describe_settings`,
:meth:`Settings.secrets`), the ``Config`` class attributes and the README's
settings table (:func:`settings_table`; ``python config.py --update-readme``).
Adding a setting means adding one field.

Precedence, highest first: explicit overrides (the CLI's flags), the real
environment, a ``.env`` file (the file named by ``ENV_FILE``, else ``./.env``, else
the ``.env`` beside the scripts: :mod:`env_files`), then the declared defaults. Nothing here runs at import time: call
:func:`load_settings` and pass the result to the code that needs it.

``Config`` keeps the class-level API older scripts use (``Config.get_api_url()``,
``Config.get_db_connection_string()``, ``Config.API_PORT`` ...); it loads the
process-wide default settings lazily; :func:`reset_settings` forgets them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlsplit

import env_files
from errors import ConfigError
from masking import mask_secrets, mask_url_password, url_passwords
from server_spec import ServerSpec, parse_server_list
from setting_parsers import (Boolean, Choice, FloatRange, Host, HttpUrlList, IntRange, Parser, PemFile, PostgresUrl,
                             SettingProblem, Verbatim)
from settings_readme import README, TABLE_END, TABLE_START, readme_settings_table, render_table, rewrite_table

PROTOCOLS = ("auto", "pc", "ollama", "openai")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Values of the widely copied example .env that cannot work until edited.
_PLACEHOLDER_VALUES = {"your_database", "your_user", "your_password", "your_api_key"}
_PLACEHOLDER_PATTERN = re.compile(r"(XXX|YYY|<[^>]*>)", re.IGNORECASE)
# Added to "the model server is not configured" errors: a way to see the chain work before the PC is ready.
DEMO_SERVER_TIP = ("No PC yet? Try the whole chain with the demo server: python demo_model_server.py "
                   "(in another terminal), then API_BASE_URL=http://127.0.0.1:8000.")


def is_placeholder(value: str | None) -> bool:
    """True for a value left as in an example file (``192.168.0.XXX``, ``your_user``)."""
    if not value:
        return False
    return value.strip().lower() in _PLACEHOLDER_VALUES or bool(_PLACEHOLDER_PATTERN.search(value))


# --- the declaration ---


@dataclass(frozen=True)
class Setting:
    """One setting's declaration; every other description of a setting is derived from it."""

    name: str  # the environment / .env variable
    default: str | None  # written as in .env and parsed like any value; None: not set
    parse: Parser
    doc: str  # one line for the README table
    secret: bool = False  # never shown, logged or echoed in an error
    example: str | None = None  # the value .env.example ships, when it differs from the default
    default_doc: str | None = None  # the README's "Default" cell when the default needs words
    field: str = ""  # the Settings attribute; filled in from the class


def setting(name: str, default: str | None, parse: Parser, doc: str, **more: Any) -> Any:
    """Declare one setting: a :class:`Settings` field whose default is ``parse(default)``."""
    declared = Setting(name, default, parse, doc, **more)
    value = None if default is None else parse(default)
    return dataclasses.field(default=value, metadata={"setting": declared})


@dataclass(frozen=True, repr=False)
class Settings:
    """Validated settings, one declared field per setting. Secrets never appear in ``repr``."""

    # Model server on the PC
    pc_ip: str | None = setting(
        "PC_IP", None, Host(port_setting="API_PORT", url_setting="API_BASE_URL"), "the PC's LAN address; the server URL is `http://{PC_IP}:{API_PORT}`",
        example="192.168.0.XXX")
    api_port: int = setting(
        "API_PORT", "8000", IntRange(1, 65535), "model server port (Ollama 11434, LM Studio 1234, llama.cpp 8080)")
    api_base_url_setting: str | None = setting(
        "API_BASE_URL", None, HttpUrlList(), "full base URL, overrides `PC_IP`/`API_PORT`; several servers: comma-separated, each with optional "
        "`#slots=N&model=NAME&protocol=P&ca=PATH` (see Several model servers); a trailing `/v1` is fine; "
        "a password in it is masked everywhere")
    api_protocol: str = setting(
        "API_PROTOCOL", "auto", Choice(PROTOCOLS), "`pc` is this project's FastAPI server; `auto` detects it")
    model_name: str = setting(
        "MODEL_NAME", "phi4", Parser(), "model for Ollama and OpenAI-compatible servers (the pc server has one model)")
    api_key: str | None = setting(
        "API_KEY", None, Parser(), "bearer token sent to the model server (OpenAI-compatible servers, or a proxy "
        "in front of the PC); never logged", secret=True)
    api_timeout: float = setting(
        "API_TIMEOUT", "300", FloatRange(0, 86400, low_inclusive=False),
        "seconds the whole answer may take; when streaming, the longest silence between two pieces")
    api_connect_timeout: float = setting(
        "API_CONNECT_TIMEOUT", "5", FloatRange(0, 600, low_inclusive=False), "seconds for the PC to accept a connection")
    api_health_timeout: float = setting(
        "API_HEALTH_TIMEOUT", "5", FloatRange(0, 600, low_inclusive=False),
        "seconds a health check or protocol probe may take")
    api_max_attempts: int = setting(
        "API_MAX_ATTEMPTS", "3", IntRange(1, 20),
        "attempts in all on refused connections, and on 429/503 (502/504: one retry at most)")
    api_retry_after_max: float = setting(
        "API_RETRY_AFTER_MAX", "60", FloatRange(0, 3600), "cap in seconds on a server's `Retry-After`")
    api_use_env_proxy: bool = setting(
        "API_USE_ENV_PROXY", "false", Boolean(),
        "honour `HTTP(S)_PROXY`/`NO_PROXY` for model-server calls (off: a LAN PC is reached directly)")
    api_max_response_bytes: int = setting(
        "API_MAX_RESPONSE_BYTES", "16777216", IntRange(1024, 2**40),
        "the largest answer accepted (16 MiB), whole or streamed; a larger one is refused")
    api_stream_max_seconds: float = setting(
        "API_STREAM_MAX_SECONDS", "0", FloatRange(0, 86400),
        "seconds a streamed answer may take in all (0: no limit; the partial answer is kept)")
    # HTTPS to the model server with a private CA
    api_ca_bundle: str | None = setting(
        "API_CA_BUNDLE", None, PemFile(),
        "PEM file of the CA that signed the model server's HTTPS certificate (Caddy's `root.crt`, mkcert's "
        "`rootCA.pem`), trusted on top of the system's CAs; `REQUESTS_CA_BUNDLE` is not read")
    model_context_tokens: int = setting(
        "MODEL_CONTEXT_TOKENS", "16384", IntRange(256, 10_000_000),
        "the model's window (Phi-4: 16,384); prompt budget and Ollama's `num_ctx`")
    max_new_tokens: int = setting("MAX_NEW_TOKENS", "512", IntRange(1, 1_000_000), "answer length")
    temperature: float = setting(
        "TEMPERATURE", "0.7", FloatRange(0, 2), "sampling temperature (the pc server needs > 0)")
    model_type: str = setting(
        "MODEL_TYPE", "phi4-quantized", Parser(), "the pc server's model label, shown by `--check`")
    # Read by the PC server only; declared so that one .env layout serves both machines
    api_host: str = setting("API_HOST", "0.0.0.0", Host(), "PC only: address the PC server binds to")
    model_dir: str | None = setting(
        "MODEL_DIR", None, Parser(), "PC only: model folder", example="./models/phi4-quantized")
    laptop_ip: str | None = setting("LAPTOP_IP", None, Host(), "the laptop's LAN address (informational)")
    # Database
    db_host: str = setting("DB_HOST", "localhost", Host(port_setting="DB_PORT", url_setting="DATABASE_URL"), "PostgreSQL host")
    db_port: int = setting("DB_PORT", "5432", IntRange(1, 65535), "PostgreSQL port")
    db_name: str | None = setting(
        "DB_NAME", None, Parser(), "database name", example="shop", default_doc="(libpq default)")
    db_user: str | None = setting(
        "DB_USER", None, Parser(), "database user", example="pipeline", default_doc="(libpq default)")
    db_password: str | None = setting(
        "DB_PASSWORD", None, Verbatim(), "database password; never logged (`.env.example` ships the sample's)",
        secret=True, example="pipeline-dev-password")
    database_url: str | None = setting(
        "DATABASE_URL", None, PostgresUrl(), "`postgresql://user:password@host:port/db`; overrides the `DB_*` values",
        secret=True)
    results_database_url: str | None = setting(
        "RESULTS_DATABASE_URL", None, PostgresUrl(), "where `--results-table` writes (the only connection that "
        "may write; use a role that may write only that table)", secret=True)
    db_connect_timeout: int = setting(
        "DB_CONNECT_TIMEOUT", "5", IntRange(1, 600), "seconds per connection attempt")
    db_connect_retries: int = setting(
        "DB_CONNECT_RETRIES", "3", IntRange(0, 20), "retries, with exponential backoff, when the server is down or starting")
    db_statement_timeout: float = setting(
        "DB_STATEMENT_TIMEOUT", "60", FloatRange(0, 86400), "seconds one query may run (0: no limit)")
    db_pool_size: int = setting("DB_POOL_SIZE", "2", IntRange(1, 50), "pooled connections")
    # Logging
    log_file: str = setting(
        "LOG_FILE", "laptop_client.log", Parser(),
        "log file (relative: in the current directory), created 0600; rotated at 5 MB, 3 kept; empty: none")
    log_level: str = setting(
        "LOG_LEVEL", "INFO", Choice(LOG_LEVELS, upper=True), "log file level (`DEBUG` includes the SQL)")

    env_file: str | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        shown = (f"{var.field}={_shown(var, getattr(self, var.field))!r}" for var in VARIABLES)
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def source_of(self, name: str) -> str:
        """Where a variable's value came from: 'flag', 'environment', the .env path or 'default'."""
        return self.sources.get(name, "default")

    def api_base_url(self) -> str:
        """The (first) model server's base URL: ``API_BASE_URL`` or ``http://{PC_IP}:{API_PORT}``.

        Without the ``#`` settings. Raises ConfigError when neither is configured or a value is
        still a placeholder.
        """
        return self.server_specs()[0].url

    def server_specs(self) -> list[ServerSpec]:
        """Every configured model server (``API_BASE_URL``'s list, else the one from ``PC_IP``)."""
        if self.api_base_url_setting:
            specs = parse_server_list(self.api_base_url_setting)
            for spec in specs:
                if is_placeholder(spec.url):
                    raise _not_configured("API_BASE_URL", spec.display, self)
            return specs
        if not self.pc_ip:
            raise ConfigError(
                "The model server is not configured yet: PC_IP is not set.",
                hint="Fix: set PC_IP (the PC's LAN address, e.g. 192.168.0.10) or API_BASE_URL "
                f"in .env, or pass --api-url http://HOST:PORT.\n{DEMO_SERVER_TIP}",
            )
        if is_placeholder(self.pc_ip):
            raise _not_configured("PC_IP", self.pc_ip, self)
        host = f"[{self.pc_ip}]" if ":" in self.pc_ip else self.pc_ip  # an IPv6 literal
        return [ServerSpec(f"http://{host}:{self.api_port}")]

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

        Raises ConfigError when a DB_* value is still an example file's placeholder.
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
        """Secret values present in these settings, for masking (see :func:`mask_secrets`).

        The value of every setting declared secret, and the password inside every URL setting.
        """
        found: list[str] = []
        for var in VARIABLES:
            value = getattr(self, var.field)
            if not value:
                continue
            if var.parse.is_url:
                for url in var.parse.urls(value):
                    found.extend(url_passwords(url))
            elif var.secret:
                found.append(value)
        return found


# Every setting in declaration order (the order of .env.example and the README table).
VARIABLES: tuple[Setting, ...] = tuple(
    dataclasses.replace(f.metadata["setting"], field=f.name)
    for f in dataclasses.fields(Settings)
    if "setting" in f.metadata
)
_BY_NAME = {var.name: var for var in VARIABLES}
SECRET_NAMES = frozenset(var.name for var in VARIABLES if var.secret)


def _shown(var: Setting, value: Any) -> Any:
    """A setting's value fit to show: secrets as ``***``; a URL keeps all but its password."""
    if value is None or value == "":
        return value
    if var.parse.is_url:
        return var.parse.mask(value)
    return "***" if var.secret else value


def _shown_raw(var: Setting, raw: str) -> str:
    """A rejected raw value fit to echo in an error message."""
    if var.secret:
        return "***"
    return mask_secrets(raw) if var.parse.is_url else raw


def _not_configured(name: str, value: str, settings: Settings) -> ConfigError:
    where = settings.source_of(name)
    place = {"flag": "on the command line", "environment": "in the environment"}.get(where, f"in {where}")
    if where.startswith("--"):
        place = f"given by {where}"
    if where == "default":
        place = "in .env"
    tip = f"\n{DEMO_SERVER_TIP}" if name in ("PC_IP", "API_BASE_URL") else ""
    return ConfigError(
        f"{name} is not configured yet: it is still the example value {value!r}.",
        hint=f"Fix: set {name} {place} to your real value (see .env.example).{tip}",
    )


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
    *,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Build validated settings.

    Args:
        overrides: explicit values by variable name (``{"API_PORT": 9000}``); None values are ignored.
        flag_names: the command-line flag that gave each override (``{"API_TIMEOUT": "--timeout"}``),
            so a bad value is reported "from --timeout" rather than "from flag".
        environ: the environment to read (default ``os.environ``).
        env_file: the .env file; default ``ENV_FILE`` from overrides/environment, else ``./.env``,
            else the ``.env`` beside the scripts, if one exists (see :mod:`env_files`). An explicitly
            named file that does not exist is an error; ``/dev/null`` or an empty file sets nothing.

    Raises:
        ConfigError: listing every bad value, its variable, where it came from and what is expected.
    """
    environ = os.environ if environ is None else environ
    flag_names = flag_names or {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(_BY_NAME) - {"ENV_FILE"})
    if unknown:
        raise ConfigError(f"Unknown setting(s): {', '.join(unknown)}.")
    found = env_files.find_env_file(env_file or given.get("ENV_FILE") or environ.get("ENV_FILE") or None)
    path, file_values = found.path, found.values

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for var in VARIABLES:
        raw: Any = None
        source = "default"
        for candidate, where in (
            (given.get(var.name), flag_names.get(var.name, "flag")),
            (environ.get(var.name), "environment"),
            (file_values.get(var.name), str(path)),
        ):
            if candidate is not None and str(candidate).strip() != "":
                raw, source = str(candidate), where
                break
        if raw is None:  # the declared default (already parsed)
            values[var.field] = Settings.__dataclass_fields__[var.field].default
            if var.default is not None:
                sources[var.name] = source
            continue
        try:
            values[var.field] = var.parse(raw)
        except SettingProblem as exc:
            problems.append(f"{exc.describe(var.name)} (from {source})")
            values[var.field] = None
        except ValueError as exc:
            problems.append(f"{var.name} must be {exc}, got {_shown_raw(var, raw)!r} (from {source})")
            values[var.field] = None
        sources[var.name] = source

    if problems:
        raise ConfigError(
            "Invalid settings:\n  " + "\n  ".join(problems),
            hint="Fix: correct the value in .env (or the environment variable / flag named above); "
            "see .env.example for every setting.",
        )
    return Settings(**values, env_file=str(path) if path is not None else None, sources=sources)


def describe_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """(name, shown value, source) for every variable, secrets masked: for users' scripts and debugging."""
    rows = []
    for var in VARIABLES:
        value = getattr(settings, var.field)
        shown = "(not set)" if value is None else str(_shown(var, value))
        rows.append((var.name, shown, settings.source_of(var.name)))
    return rows


# --- the README's settings table, generated from the declaration ---


def settings_table() -> str:
    """The README's Configuration table (Markdown), one row per declared setting."""
    return render_table(VARIABLES, is_placeholder)


def update_readme(path: str | os.PathLike[str] = README) -> bool:
    """Rewrite the settings table between the README's markers; True when the file changed."""
    return rewrite_table(path, settings_table())


# --- the process-wide default settings, for the class-level API and ``python -c`` helpers ---

_cached: Settings | None = None


def get_settings(reload: bool = False) -> Settings:
    """Settings from the environment and .env, loaded once per process (see :func:`reset_settings`)."""
    global _cached
    if _cached is None or reload:
        _cached = load_settings()
    return _cached


def reset_settings() -> None:
    """Forget the process-wide default settings; the next use loads them again."""
    global _cached
    _cached = None


class _ConfigMeta(type):
    def __getattr__(cls, name: str) -> Any:
        var = _BY_NAME.get(name)
        if var is None:
            raise AttributeError(name)
        return getattr(get_settings(), var.field)


class Config(metaclass=_ConfigMeta):
    """Class-level API: ``Config.API_PORT``, ``Config.get_api_url()``, ``Config.get_db_connection_string()``."""

    @classmethod
    def get_api_url(cls) -> str:
        return get_settings().api_base_url()

    @classmethod
    def get_db_connection_string(cls) -> str:
        return get_settings().db_connection_string()

    @classmethod
    def reload(cls) -> Settings:
        return get_settings(reload=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python config.py --settings-table`` prints the table; ``--update-readme`` rewrites README.md's."""
    parser = argparse.ArgumentParser(prog="python config.py", description=main.__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--settings-table", action="store_true", help="print the README's settings table")
    action.add_argument("--update-readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    if args.settings_table:
        sys.stdout.write(settings_table())
    else:
        print("README.md updated" if update_readme() else "README.md is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
