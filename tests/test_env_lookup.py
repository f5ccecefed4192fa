"""Which .env is read: ENV_FILE / --env-file, else ./.env, else the one beside the scripts.

conftest points the "beside the scripts" folder (``env_files.SCRIPT_DIR``) at ``tmp_path/scripts``
for every test, so a developer's own .env never leaks in; the tests here put files there. One
test copies the scripts to a folder of their own and runs the real command from elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import env_files
from conftest import REPO_ROOT, SETTING_NAMES
from errors import ConfigError
from fake_ollama_server import FakeOllamaServer
from test_pipeline import run  # noqa: F401  (the fixture: the command in-process)


@pytest.fixture
def beside_scripts(tmp_path: Path) -> Path:
    folder = env_files.SCRIPT_DIR
    assert folder == tmp_path / "scripts"  # conftest's isolation, not the real repository
    folder.mkdir()
    return folder


def test_the_env_beside_the_scripts_is_used_from_another_folder(beside_scripts):
    (beside_scripts / ".env").write_text("MAX_NEW_TOKENS=321\nDB_NAME=from_scripts\n", encoding="utf-8")
    settings = config.load_settings(environ={})
    assert settings.max_new_tokens == 321 and settings.env_file == str(beside_scripts / ".env")
    assert settings.source_of("DB_NAME") == str(beside_scripts / ".env")


def test_the_current_directory_comes_first(tmp_path, beside_scripts):
    (beside_scripts / ".env").write_text("MAX_NEW_TOKENS=321\n", encoding="utf-8")
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=123\n", encoding="utf-8")
    settings = config.load_settings(environ={})
    assert settings.max_new_tokens == 123 and settings.env_file == ".env"


def test_precedence_holds_with_the_file_beside_the_scripts(beside_scripts):
    (beside_scripts / ".env").write_text("API_PORT=1111\nDB_PORT=2222\nMAX_NEW_TOKENS=3333\n", encoding="utf-8")
    s = config.load_settings({"API_PORT": "9999"}, environ={"API_PORT": "8888", "DB_PORT": "7777"})
    assert (s.api_port, s.source_of("API_PORT")) == (9999, "flag")
    assert (s.db_port, s.source_of("DB_PORT")) == (7777, "environment")
    assert (s.max_new_tokens, s.source_of("MAX_NEW_TOKENS")) == (3333, str(beside_scripts / ".env"))
    assert (s.temperature, s.source_of("TEMPERATURE")) == (0.7, "default")


@pytest.mark.parametrize("named", [os.devnull, "empty.env"])
def test_dev_null_or_an_empty_file_means_no_env_file(tmp_path, beside_scripts, named):
    (tmp_path / "empty.env").write_text("", encoding="utf-8")
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=123\n", encoding="utf-8")
    (beside_scripts / ".env").write_text("MAX_NEW_TOKENS=321\n", encoding="utf-8")
    settings = config.load_settings(environ={"ENV_FILE": named})
    assert settings.max_new_tokens == 512 and settings.source_of("MAX_NEW_TOKENS") == "default"
    assert "sets nothing" in env_files.describe_env_file(settings.env_file, settings.sources)


def test_a_named_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        config.load_settings(environ={"ENV_FILE": str(tmp_path)})


def test_check_and_verbose_say_which_file(run, tmp_path, beside_scripts):
    (beside_scripts / ".env").write_text("MAX_NEW_TOKENS=77\n", encoding="utf-8")
    with FakeOllamaServer() as srv:
        check = run("--check", env={"API_BASE_URL": srv.base_url})
        verbose = run("--query", "SELECT 1 AS x", "--dry-run", "-v", env={"API_BASE_URL": srv.base_url})
        none = run("--check", env={"API_BASE_URL": srv.base_url, "ENV_FILE": os.devnull})
    where = str(beside_scripts / ".env")
    assert f"[ OK ] settings: loaded from {where} (beside the scripts: the current directory has no .env)" \
        in check.stdout
    assert f"Settings from {where} (beside the scripts" in verbose.stderr
    assert none.returncode == 0 and f"[ OK ] settings: loaded from the environment and defaults ({os.devnull} sets" \
        in none.stdout


def test_the_real_command_finds_the_env_beside_its_scripts(tmp_path, test_db_url):
    scripts = tmp_path / "clone"
    scripts.mkdir()
    for source in REPO_ROOT.glob("*.py"):
        shutil.copy(source, scripts / source.name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    with FakeOllamaServer() as srv:
        (scripts / ".env").write_text(f"DATABASE_URL={test_db_url}\nAPI_BASE_URL={srv.base_url}\nLOG_FILE=\n",
                                      encoding="utf-8")
        result = subprocess.run([sys.executable, str(scripts / "db_to_model_pipeline.py"), "--check"],
                                cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
        (elsewhere / ".env").write_text("API_BASE_URL=http://127.0.0.1:1\nDATABASE_URL=postgresql://x@127.0.0.1:1/x\n"
                                        "DB_CONNECT_RETRIES=0\nLOG_FILE=\n", encoding="utf-8")
        shadowed = subprocess.run([sys.executable, str(scripts / "db_to_model_pipeline.py"), "--check"],
                                  cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"loaded from {scripts / '.env'} (beside the scripts" in result.stdout
    assert shadowed.returncode == 3 and "loaded from .env, the environment and defaults" in shadowed.stdout
