"""Masking: secrets out of any text before it is printed, logged or put in an error message.

One masker for every channel (stderr, stdout, the log file, --json): it replaces the known
secret values it is given, then anything shaped like a password (``://user:PASSWORD@``,
``password=...``, ``api_key: ...``, ``Authorization: Bearer ...``) whether known or not.
"""

from __future__ import annotations

import re
from typing import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

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
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: fall back to the pattern masker
        return mask_secrets(url)
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


def url_passwords(url: str) -> list[str]:
    """The password in a URL as written and percent-decoded (either may reach a message)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    if not password:
        return []
    return [password] if unquote(password) == password else [password, unquote(password)]
