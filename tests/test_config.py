"""Settings: precedence, validation messages, placeholders, masking; .env.example and docker-compose.yml."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

import config
from config import Config, load_settings
from conftest import REPO_ROOT
from errors import ConfigError


def write_env(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_declared_ones():
    s = load_settings(environ={})
    assert (s.api_port, s.model_type, s.max_new_tokens, s.temperature) == (8000, "phi4-quantized", 512, 0.7)
    assert (s.db_host, s.db_port, s.api_timeout, s.api_host) == ("localhost", 5432, 300.0, "0.0.0.0")
    assert s.api_protocol == "auto" and s.model_name == "phi4" and s.api_max_attempts == 3


def test_precedence_flag_over_environment_over_env_file_over_default(tmp_path):
    write_env(tmp_path / ".env", "API_PORT=1111\nDB_PORT=2222\nMAX_NEW_TOKENS=3333\n")
    s = load_settings({"API_PORT": 9999}, environ={"API_PORT": "8888", "DB_PORT": "7777"})
    assert s.api_port == 9999 and s.source_of("API_PORT") == "flag"
    assert s.db_port == 7777 and s.source_of("DB_PORT") == "environment"
    assert s.max_new_tokens == 3333 and s.source_of("MAX_NEW_TOKENS") == ".env"
    assert s.temperature == 0.7 and s.source_of("TEMPERATURE") == "default"


def test_env_file_never_overrides_the_real_environment(tmp_path):
    write_env(tmp_path / ".env", "DB_NAME=from_file\n")
    assert load_settings(environ={"DB_NAME": "from_env"}).db_name == "from_env"
    assert "DB_NAME" not in os.environ  # loading does not export the file either


def test_env_file_named_by_ENV_FILE_replaces_dot_env(tmp_path):
    write_env(tmp_path / ".env", "DB_NAME=default_file\n")
    other = write_env(tmp_path / "staging.env", "DB_NAME=staging\n")
    assert load_settings(environ={"ENV_FILE": str(other)}).db_name == "staging"
    assert load_settings(env_file=other, environ={}).db_name == "staging"


def test_missing_named_env_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"env file .*nope\.env does not exist"):
        load_settings(environ={"ENV_FILE": str(tmp_path / "nope.env")})


def test_inline_comments_and_utf8_in_env_file(tmp_path):
    write_env(tmp_path / ".env", "PC_IP=192.168.0.10  # PC의 로컬 IP 주소\nDB_NAME=상점\n")
    s = load_settings(environ={})
    assert s.pc_ip == "192.168.0.10" and s.db_name == "상점"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("API_PORT", "abc", "API_PORT must be an integer from 1 to 65535, got 'abc'"),
        ("API_PORT", "70000", "API_PORT must be an integer from 1 to 65535, got '70000'"),
        ("DB_PORT", "0", "DB_PORT must be an integer from 1 to 65535, got '0'"),
        ("TEMPERATURE", "hot", "TEMPERATURE must be a number from 0 to 2, got 'hot'"),
        ("TEMPERATURE", "nan", "TEMPERATURE must be a number from 0 to 2, got 'nan'"),
        ("MAX_NEW_TOKENS", "-5", "MAX_NEW_TOKENS must be an integer from 1 to"),
        ("API_TIMEOUT", "0", "API_TIMEOUT must be a number greater than 0"),
        ("API_PROTOCOL", "grpc", "API_PROTOCOL must be one of auto, pc, ollama, openai, got 'grpc'"),
        ("API_BASE_URL", "192.168.0.10:8000", "API_BASE_URL must be a full URL such as http://"),
        ("API_BASE_URL", "ftp://pc:21", "API_BASE_URL must be a full URL"),
        ("DATABASE_URL", "mysql://u@h/db", "DATABASE_URL must be a URL such as postgresql://"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
        ("API_USE_ENV_PROXY", "maybe", "API_USE_ENV_PROXY must be true or false, got 'maybe'"),
        ("PC_IP", "192.168.0.10 ", None),  # surrounding space is trimmed, not an error
    ],
)
def test_bad_values_name_the_variable_value_and_expectation(name, value, expected):
    if expected is None:
        load_settings({name: value}, environ={})
        return
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: value})
    assert expected in str(info.value)
    assert "(from environment)" in str(info.value)


def test_every_bad_value_is_reported_at_once(tmp_path):
    write_env(tmp_path / ".env", "API_PORT=x\nDB_PORT=y\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    text = str(info.value)
    assert "API_PORT must be" in text and "DB_PORT must be" in text and "(from .env)" in text


def test_placeholder_pc_ip_is_reported_not_sent():
    s = load_settings({"PC_IP": "192.168.0.XXX"}, environ={})
    with pytest.raises(ConfigError, match=r"PC_IP is not configured yet.*\n.*set PC_IP"):
        s.api_base_url()


def test_missing_pc_ip_says_what_to_set():
    with pytest.raises(ConfigError, match="PC_IP is not set"):
        load_settings(environ={}).api_base_url()


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({"PC_IP": "192.168.0.10"}, "http://192.168.0.10:8000"),
        ({"PC_IP": "192.168.0.10", "API_PORT": 11434}, "http://192.168.0.10:11434"),
        ({"PC_IP": "192.168.0.10", "API_BASE_URL": "https://llm.lan:8443/"}, "https://llm.lan:8443"),
        ({"API_BASE_URL": "http://pc:8080/v1"}, "http://pc:8080/v1"),
        ({"PC_IP": "fe80::1"}, "http://[fe80::1]:8000"),
    ],
)
def test_api_url(overrides, url):
    assert load_settings(overrides, environ={}).api_base_url() == url


def test_example_db_placeholders_are_reported():
    s = load_settings({"DB_NAME": "your_database", "DB_USER": "your_user", "DB_PASSWORD": "your_password"}, environ={})
    with pytest.raises(ConfigError, match="DB_NAME is not configured yet"):
        s.db_connect_kwargs()


def test_connection_string_escapes_the_password():
    s = load_settings({"DB_USER": "app", "DB_PASSWORD": "p@ss:w/rd", "DB_NAME": "shop", "DB_HOST": "db"}, environ={})
    assert s.db_connection_string() == "postgresql://app:p%40ss%3Aw%2Frd@db:5432/shop"
    from urllib.parse import unquote, urlsplit

    assert unquote(urlsplit(s.db_connection_string()).password) == "p@ss:w/rd"


def test_database_url_overrides_db_parts():
    s = load_settings({"DATABASE_URL": "postgresql://u:pw@h:6543/d", "DB_NAME": "ignored"}, environ={})
    assert s.db_connect_kwargs() == {"dsn": "postgresql://u:pw@h:6543/d"}
    assert s.db_display() == "u@h:6543/d"


def test_secrets_never_show_in_repr_or_describe(caplog):
    s = load_settings(
        {"DB_PASSWORD": "pw-Sentinel-1", "API_KEY": "sk-Sentinel-2", "DATABASE_URL": "postgresql://u:pw-Sentinel-3@h/d"},
        environ={},
    )
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("settings: %s", s)
    shown = repr(s) + str(s) + repr(config.describe_settings(s)) + caplog.text
    for secret in ("pw-Sentinel-1", "sk-Sentinel-2", "pw-Sentinel-3"):
        assert secret not in shown
    assert "postgresql://u:***@h/d" in repr(s)
    assert set(s.secrets()) == {"pw-Sentinel-1", "sk-Sentinel-2", "pw-Sentinel-3"}


def test_bad_secret_value_is_not_echoed():
    with pytest.raises(ConfigError) as info:
        load_settings({"DATABASE_URL": "mysql://u:TopSecret@h/d"}, environ={})
    assert "TopSecret" not in str(info.value)


def test_config_class_level_api(tmp_path):
    write_env(tmp_path / ".env", "PC_IP=10.0.0.5\nAPI_PORT=9000\nDB_USER=me\nDB_PASSWORD=a b\nDB_NAME=shop\n")
    config.reset_settings()
    assert Config.get_api_url() == "http://10.0.0.5:9000"
    assert Config.get_db_connection_string() == "postgresql://me:a%20b@localhost:5432/shop"
    assert Config.API_PORT == 9000 and Config.MAX_NEW_TOKENS == 512
    with pytest.raises(AttributeError):
        Config.NOT_A_SETTING  # noqa: B018


def test_importing_modules_reads_no_environment(tmp_path):
    # A broken .env must not break imports: settings are loaded only when asked for.
    write_env(tmp_path / ".env", "API_PORT=broken\n")
    code = "import config, db_connector, prompt_builder, model_api_client; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.stdout.strip() == "ok", result.stderr


# --- .env.example and docker-compose.yml ----------------------------------------------


def env_example_lines() -> list[tuple[str, str, bool]]:
    """(name, value, active) for every ``NAME=value`` line of .env.example, commented-out ones too."""
    found = []
    for line in (REPO_ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(\S*)", line)
        if match:
            found.append((match.group(2), match.group(3), match.group(1) is None))
    return found


def test_env_example_lists_every_declared_setting_in_order():
    assert [name for name, _, _ in env_example_lines()] == [var.name for var in config.VARIABLES]


def test_env_example_values_are_the_declared_defaults_or_examples():
    by_name = {var.name: var for var in config.VARIABLES}
    for name, value, active in env_example_lines():
        var = by_name[name]
        if active:
            shipped = var.example if var.example is not None else var.default
            assert value == shipped, f"{name}={value} in .env.example, but config.py declares {shipped!r}"
        if value:
            var.parse(value)  # every value shown, commented out or not, is a valid one


def test_readme_settings_table_is_generated_from_the_declaration():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = config.readme_settings_table(readme)
    assert table is not None, "README.md lost the settings table markers"
    assert table == config.settings_table(), "README.md's settings table is stale: run python config.py --update-readme"
    for var in config.VARIABLES:
        assert f"| `{var.name}` |" in table


def test_update_readme_rewrites_a_stale_table(tmp_path):
    stale = f"# Title\n\n{config.TABLE_START}\n| Variable |\n| `OLD` |\n{config.TABLE_END}\n\nAfter.\n"
    readme = write_env(tmp_path / "README.md", stale)
    assert config.update_readme(readme) is True
    text = readme.read_text(encoding="utf-8")
    assert config.readme_settings_table(text) == config.settings_table()
    assert text.startswith("# Title\n\n") and text.endswith("\n\nAfter.\n") and "`OLD`" not in text
    assert config.update_readme(readme) is False  # already up to date: left alone
    with pytest.raises(ConfigError, match="no generated settings table"):
        config.update_readme(write_env(tmp_path / "other.md", "no markers\n"))


def test_settings_table_command_prints_the_table(capsys):
    assert config.main(["--settings-table"]) == 0
    assert capsys.readouterr().out == config.settings_table()


def test_every_declaration_is_complete_and_its_default_parses():
    assert len({var.name for var in config.VARIABLES}) == len(config.VARIABLES)
    defaults = config.Settings()
    for var in config.VARIABLES:
        assert var.doc and var.field and "|" not in var.name
        expected = None if var.default is None else var.parse(var.default)
        assert getattr(defaults, var.field) == expected
    assert config.SECRET_NAMES == {"API_KEY", "DB_PASSWORD", "DATABASE_URL", "RESULTS_DATABASE_URL"}


def test_reset_settings_forgets_the_process_wide_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("API_PORT", "1234")
    assert config.get_settings().api_port == 1234
    monkeypatch.setenv("API_PORT", "4321")
    assert config.get_settings().api_port == 1234 and Config.API_PORT == 1234  # loaded once
    config.reset_settings()
    assert config.get_settings().api_port == 4321 and Config.API_PORT == 4321


def test_password_in_api_base_url_is_masked_and_listed_as_a_secret():
    s = load_settings({"API_BASE_URL": "http://bob:Hunter2%21@pc:8000"}, environ={})
    assert "Hunter2" not in repr(s) and "http://bob:***@pc:8000" in repr(s)
    assert ("API_BASE_URL", "http://bob:***@pc:8000", "flag") in config.describe_settings(s)
    assert set(s.secrets()) == {"Hunter2%21", "Hunter2!"}  # as written and percent-decoded
    with pytest.raises(ConfigError) as info:
        load_settings({"API_BASE_URL": "http://bob:Hunter2@pc:99999"}, environ={})
    assert "Hunter2" not in str(info.value) and "bob:***@pc" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"API_BASE_URL": "http://bob:Hunter2@192.168.0.XXX:8000"}, environ={}).api_base_url()
    assert "Hunter2" not in str(info.value) and "not configured yet" in str(info.value)


def test_env_example_loads_and_only_the_pc_address_needs_editing(tmp_path):
    (tmp_path / ".env").write_text((REPO_ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8")
    s = load_settings(environ={})
    assert (s.db_name, s.db_user, s.db_port) == ("shop", "pipeline", 5432)
    s.db_connect_kwargs()  # database values are usable as shipped
    with pytest.raises(ConfigError, match="PC_IP is not configured yet"):
        s.api_base_url()


def test_docker_compose_serves_the_env_example_database():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    service = compose["services"]["postgres"]
    assert service["image"] == "postgres:15"
    env = service["environment"]
    assert env["POSTGRES_DB"].startswith("${DB_NAME")
    assert env["POSTGRES_USER"].startswith("${DB_USER")
    assert env["POSTGRES_PASSWORD"].startswith("${DB_PASSWORD")
    assert any("${DB_PORT:-5432}:5432" in port for port in service["ports"])
    assert "pg_isready" in " ".join(service["healthcheck"]["test"])
    assert "./db/init:/docker-entrypoint-initdb.d:ro" in service["volumes"]
    named = service["volumes"][0].split(":")[0]
    assert named in compose["volumes"]
    example = dotenv_values(REPO_ROOT / ".env.example")
    # The defaults in compose agree with the values .env.example ships.
    assert env["POSTGRES_DB"] == "${DB_NAME:-" + example["DB_NAME"] + "}"
    assert env["POSTGRES_USER"] == "${DB_USER:-" + example["DB_USER"] + "}"
    assert example["DB_HOST"] in ("localhost", "127.0.0.1")
    init_files = sorted(p.name for p in (REPO_ROOT / "db" / "init").glob("*.sql"))
    assert init_files == ["01_schema.sql", "02_data.sql"]
