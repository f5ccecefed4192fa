"""Several servers in one setting: API_BASE_URL lists, the #slots/#model/#protocol/#ca settings, and
the address mistakes that get a fix instead of a parse error (an endpoint path, a port in PC_IP)."""

from __future__ import annotations

import pytest

import config
from cli_args import build_parser, setting_overrides
from errors import ConfigError
from server_spec import ServerSpec, parse_server, parse_server_list


def load(**values: str) -> config.Settings:
    return config.load_settings(values, environ={})


def problem(**values: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(**values).server_specs()
    return str(info.value)


def test_one_url_is_one_server_as_before():
    s = load(API_BASE_URL="http://192.168.0.10:8000/")
    assert s.server_specs() == [ServerSpec("http://192.168.0.10:8000")]
    assert s.api_base_url() == "http://192.168.0.10:8000"
    assert load(PC_IP="192.168.0.10", API_PORT="11434").server_specs() == [ServerSpec("http://192.168.0.10:11434")]


def test_a_comma_separated_list_with_settings_after_the_hash():
    s = load(API_BASE_URL=" http://192.168.0.10:8000 , http://192.168.0.11:11434#slots=4&model=phi4:14b,"
                          "https://gpu.lan/v1#protocol=OpenAI&ca=/etc/lan-ca.pem")
    assert s.server_specs() == [
        ServerSpec("http://192.168.0.10:8000"),
        ServerSpec("http://192.168.0.11:11434", slots=4, model="phi4:14b"),
        ServerSpec("https://gpu.lan/v1", protocol="openai", ca_bundle="/etc/lan-ca.pem"),
    ]
    assert s.api_base_url() == "http://192.168.0.10:8000"  # the first server, for existing callers
    assert s.server_specs()[1].text() == "http://192.168.0.11:11434#slots=4&model=phi4:14b"


def test_passwords_in_every_listed_url_are_secrets_and_masked():
    s = load(API_BASE_URL="http://bob:Hunter2@a:1,http://eve:S3cret%21@b:2#slots=2")
    assert set(s.secrets()) == {"Hunter2", "S3cret%21", "S3cret!"}
    shown = dict((name, value) for name, value, _ in config.describe_settings(s))["API_BASE_URL"]
    assert shown == "http://bob:***@a:1,http://eve:***@b:2#slots=2"
    assert "Hunter2" not in repr(s) and "S3cret" not in repr(s)
    assert [spec.display for spec in s.server_specs()] == ["http://bob:***@a:1", "http://eve:***@b:2"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://a:1,http://b:2#slots=four",
         "the server http://b:2 (server 2 of 2) has slots=four: slots must be a whole number from 1 to 256, "
         "as in http://b:2#slots=4"),
        ("http://b:2#slots=0", "slots must be a whole number from 1 to 256"),
        ("http://b:2#slot=4", "unknown setting 'slot=4' after '#': write http://b:2#slots=4"),
        ("http://b:2#modle=phi4", "write http://b:2#model=phi4"),
        ("http://b:2#protocol=grpc", "has protocol=grpc: write one of pc, ollama, openai"),
        ("http://b:2#slots=2&slots=3", "sets slots twice"),
        ("http://b:2#model=", "has an empty model="),
        ("http://a:1,http://A:1/", "http://A:1 is listed twice"),
        ("http://a:1,192.168.0.11:11434", "'192.168.0.11:11434' (server 2 of 2) is not a full URL"),
        ("http://bob:Hunter2@b:2#slots=x", "the server http://bob:***@b:2 has slots=x"),
        ("http://b:2#slots=4#model=phi4", "joined by '&', not by another '#': write http://b:2#slots=4&model=phi4"),
    ],
)
def test_a_bad_server_entry_names_the_server_and_the_fix(value, expected):
    text = problem(API_BASE_URL=value)
    assert "API_BASE_URL: " in text and expected in text
    assert "Hunter2" not in text


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://host:8000/api/generate", "http://host:8000"),
        ("http://host:11434/api/chat", "http://host:11434"),
        ("http://host:11434/api/tags/", "http://host:11434"),
        ("http://host:8080/v1/chat/completions", "http://host:8080"),
        ("http://host:8080/completion", "http://host:8080"),
        ("https://proxy.lan/llm/v1/chat/completions", "https://proxy.lan/llm"),
        ("http://host:8000/api/generate?stream=false", "http://host:8000"),
        ("http://bob:Hunter2@host:8000/api/generate", "http://bob:***@host:8000"),
        ("http://host:8080/health", "http://host:8080"),  # llama.cpp's and vLLM's health check
        ("http://host:8000/docs", "http://host:8000"),  # the pc server's (FastAPI's) API page
        ("http://host:8000/redoc/", "http://host:8000"),
        ("http://host:8000/metrics", "http://host:8000"),
    ],
)
def test_an_endpoint_instead_of_the_base_url_says_which_base_url_to_use(url, base):
    text = problem(API_BASE_URL=url)
    assert f"is an endpoint" in text and f"use {base} (the client adds the endpoint paths itself)" in text


def test_a_base_url_with_v1_is_still_fine():
    assert load(API_BASE_URL="http://pc:1234/v1").api_base_url() == "http://pc:1234/v1"


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("127.0.0.1:8000", "write PC_IP=127.0.0.1 and API_PORT=8000"),
        ("192.168.0.10:11434", "write PC_IP=192.168.0.10 and API_PORT=11434"),
        ("[fe80::1]:8000", "write PC_IP=fe80::1 and API_PORT=8000"),
    ],
)
def test_a_port_in_pc_ip_shows_the_two_settings_to_write(value, fix):
    text = problem(PC_IP=value)
    assert f"PC_IP={value} has a port in it: {fix}" in text


def test_an_ipv6_pc_ip_is_not_mistaken_for_a_port():
    assert load(PC_IP="fe80::1").api_base_url() == "http://[fe80::1]:8000"


def test_a_port_in_db_host_names_db_port():
    assert "write DB_HOST=db.lan and DB_PORT=5433" in problem(DB_HOST="db.lan:5433")


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("http://192.168.0.10:8000", "write PC_IP=192.168.0.10 and API_PORT=8000, or give the whole URL as "
                                     "API_BASE_URL=http://192.168.0.10:8000"),
        ("https://pc.lan", "write PC_IP=pc.lan, or give the whole URL as API_BASE_URL=https://pc.lan"),
    ],
)
def test_a_url_in_pc_ip_shows_what_to_write(value, fix):
    assert f"PC_IP={value} is a URL, not a host name or IP address: {fix}" in problem(PC_IP=value)


@pytest.mark.parametrize("value", ["192.168.0.10:abc", "192.168.0.10:", "a:b:c", "[::1]"])
def test_a_colon_that_is_neither_a_port_nor_ipv6_is_a_configuration_error(value):
    # These used to pass, then fail inside the HTTP client as an internal error.
    text = problem(PC_IP=value)
    assert f"PC_IP" in text and value in text
    if value.count(":") == 1 and not value.startswith("["):
        assert "is not a port number; write PC_IP=192.168.0.10, and the port as API_PORT" in text


def test_placeholder_in_any_listed_server_is_not_configured_yet():
    text = problem(API_BASE_URL="http://192.168.0.10:8000,http://192.168.0.XXX:11434")
    assert "API_BASE_URL is not configured yet" in text and "192.168.0.XXX" in text


def test_api_url_flag_is_repeatable_and_takes_comma_lists():
    args = build_parser().parse_args(["--api-url", "http://a:1", "--api-url", "http://b:2#slots=2,http://c:3"])
    overrides = setting_overrides(args)
    assert overrides["API_BASE_URL"] == "http://a:1,http://b:2#slots=2,http://c:3"
    specs = config.load_settings(overrides, environ={}).server_specs()
    assert [spec.url for spec in specs] == ["http://a:1", "http://b:2", "http://c:3"]
    assert setting_overrides(build_parser().parse_args([]))["API_BASE_URL"] is None


def test_the_parser_alone():
    assert parse_server("http://h:1#ca=/path%20with%20space.pem").ca_bundle == "/path with space.pem"
    assert parse_server("http://h:1#").slots is None  # an empty fragment is nothing
    assert [s.url for s in parse_server_list("http://a:1,,http://b:2,")] == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="query string"):
        parse_server("http://h:1/?x=1")
