"""Which ``.env`` file the settings come from.

* Named by ``--env-file`` or ``ENV_FILE``: that file. ``/dev/null`` or an empty file gives no
  values: the way to say "no env file" (a file that does not exist is an error).
* Otherwise the first that exists of ``.env`` in the current directory and ``.env`` beside the
  scripts (:data:`SCRIPT_DIR`, the repository folder), so a command started from another
  folder still finds the repository's settings instead of silently using the defaults.

A file found here never overrides the real environment or a flag (see :mod:`config`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from dotenv import dotenv_values

from errors import ConfigError

logger = logging.getLogger(__name__)

#: The folder holding the scripts: the second place a ``.env`` is looked for.
SCRIPT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class EnvFile:
    """The env file chosen (``path`` None: none) and the values it holds."""

    path: Path | None
    values: dict[str, str | None] = field(default_factory=dict)
    explicit: bool = False  # named by --env-file or ENV_FILE


def read_env_file(path: Path) -> dict[str, str | None]:
    """The ``NAME=value`` lines of one file (inline comments and quotes handled by python-dotenv)."""
    try:
        return dict(dotenv_values(path, encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Cannot read {path}: it is not UTF-8 ({exc.reason}).",
            hint="Fix: save the file as UTF-8.",
        ) from None
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror}.", hint="Fix: check the file's permissions.") from None


def find_env_file(explicit: str | os.PathLike[str] | None, script_dir: Path | None = None) -> EnvFile:
    """The env file to read: ``explicit`` (from --env-file / ENV_FILE), else ./.env, else the one beside the scripts.

    Raises ConfigError when an explicitly named file does not exist or is a directory.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists() or path.is_dir():  # /dev/null is not a regular file, and is fine
            raise ConfigError(
                f"The env file {path} {'is a directory' if path.is_dir() else 'does not exist'}.",
                hint="Fix: check the path given by --env-file or ENV_FILE, or create it: cp .env.example .env "
                "(ENV_FILE=/dev/null reads no env file).",
            )
        return EnvFile(path, read_env_file(path), explicit=True)
    here = Path(".env")
    if here.is_file():
        return EnvFile(here, read_env_file(here))
    beside = (script_dir or SCRIPT_DIR) / ".env"
    if beside.is_file():
        return EnvFile(beside, read_env_file(beside))
    return EnvFile(None)


def describe_env_file(env_file: str | None, sources: Mapping[str, str], script_dir: Path | None = None) -> str:
    """Which file the settings were read from, in words, for ``--check`` and ``-v``."""
    if env_file is None:
        return "the environment and defaults (no .env in the current directory or beside the scripts)"
    if env_file not in sources.values():
        return f"the environment and defaults ({env_file} sets nothing, or nothing that is not set already)"
    path = Path(env_file)
    if path.is_absolute() and path.parent == (script_dir or SCRIPT_DIR) and not Path(".env").is_file():
        return f"{env_file} (beside the scripts: the current directory has no .env), the environment and defaults"
    return f"{env_file}, the environment and defaults"
