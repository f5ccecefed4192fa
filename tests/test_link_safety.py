"""Credentials in clear and public addresses over plain HTTP: the decisions (pure functions, for
loopback, private and public addresses) and how the command says so, once per run and in
``--check``. Traffic goes to loopback only: the public address is reached through a loopback
fake server acting as the environment's HTTP proxy."""

from __future__ import annotations

import pytest

from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER
from link_safety import bounded_resolver, credential_warning, is_loopback_host, public_address_warning
from test_pipeline import run  # noqa: F401 - the command-line fixture

KEY = "sk-lan-3f9a7c2e"
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")

LOOPBACK = ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST.", "api.localhost", "[::1]", "[::ffff:127.0.0.1]"]
PRIVATE = ["10.0.0.5", "172.16.0.1", "172.31.255.254", "192.168.0.10", "169.254.10.20", "[fe80::1]", "[fd12:3456::1]",
           "[fc00::7]"]
PUBLIC = ["8.8.8.8", "172.32.0.1", "203.0.113.10", "100.64.1.2", "[2606:4700::1111]", "[::ffff:8.8.8.8]"]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_hosts(host):
    assert is_loopback_host(host.strip("[]"))


@pytest.mark.parametrize("host", LOOPBACK)
def test_no_credential_warning_for_loopback(host):
    assert credential_warning(f"http://{host}:8000", has_api_key=True) is None
    assert credential_warning(f"http://user:pw@{host}:8000", has_api_key=True) is None


@pytest.mark.parametrize("host", PRIVATE + PUBLIC + ["pc.lan", "my-pc"])
def test_a_key_over_plain_http_to_any_other_host_is_warned_about(host):
    warning = credential_warning(f"http://{host}:8000/v1", has_api_key=True)
    assert warning is not None
    assert warning.startswith(f"API_KEY (a bearer token) would be sent in clear over plain HTTP to http://{host}:8000:")
    assert "Fix: reach the server over HTTPS" in warning and "LAN-only address" in warning


def test_url_credentials_are_warned_about_and_masked():
    warning = credential_warning("http://admin:hunter2%40x@192.168.0.10:8000", has_api_key=False)
    assert warning is not None and "the user name and password in the server's URL" in warning
    assert "hunter2" not in warning and "admin" not in warning
    both = credential_warning("http://admin:hunter2@192.168.0.10:8000", has_api_key=True)
    assert both is not None and "API_KEY (a bearer token) and the user name and password" in both
    assert "read and reuse them" in both


@pytest.mark.parametrize("url", [
    "https://192.168.0.10:8443", "https://user:pw@8.8.8.8", "HTTPS://pc.example.com",  # encrypted
    "http://192.168.0.10:8000", "http://8.8.8.8:8000",  # nothing secret to send
])
def test_no_credential_warning_over_https_or_without_credentials(url):
    assert credential_warning(url, has_api_key="https" in url.lower()) is None


@pytest.mark.parametrize("host", LOOPBACK + PRIVATE)
def test_private_and_loopback_addresses_are_not_public(host):
    assert public_address_warning(f"http://{host}:8000") is None


@pytest.mark.parametrize("host", PUBLIC)
def test_public_addresses_over_plain_http_are_warned_about(host):
    warning = public_address_warning(f"http://{host}:11434")
    assert warning is not None
    assert warning.startswith(f"the model server http://{host}:11434 is reached over plain HTTP at an address "
                              "outside the private ranges")
    assert "Fix: use the PC's LAN address, or HTTPS" in warning
    assert public_address_warning(f"https://{host}:11434") is None


def test_host_names_are_judged_only_through_the_resolver_given():
    url = "http://user:secret@models.example.com:8000"
    assert public_address_warning(url) is None  # no DNS without a resolver
    assert public_address_warning(url, lambda host: ["192.168.0.20", "fd00::20"]) is None
    assert public_address_warning(url, lambda host: []) is None  # unknown: not judged
    warning = public_address_warning(url, lambda host: ["192.168.0.20", "198.51.100.7"])
    assert warning is not None and "http://models.example.com:8000 (198.51.100.7)" in warning
    assert "secret" not in warning
    asked: list[str] = []
    assert public_address_warning("http://localhost:8000", lambda host: asked.append(host) or ["8.8.8.8"]) is None
    assert asked == []  # localhost is loopback by name


def test_bounded_resolver_answers_for_localhost():
    addresses = bounded_resolver(5.0)("localhost")
    assert addresses and all(is_loopback_host(address) for address in addresses)


# --- the command line: once per run, and in --check --------------------------------------


@pytest.fixture
def through_loopback_proxy(monkeypatch):
    """Point the environment's HTTP proxy at a loopback fake PC server, which answers any URL."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with FakePCServer() as srv:
        env = {"HTTP_PROXY": srv.base_url, "http_proxy": srv.base_url, "API_USE_ENV_PROXY": "true",
               "API_BASE_URL": "http://203.0.113.10:8000", "API_PROTOCOL": "pc", "API_KEY": KEY}
        yield srv, env


def test_a_run_warns_once_about_a_key_sent_in_clear(run, through_loopback_proxy, tmp_path):
    srv, env = through_loopback_proxy
    result = run("--query", "SELECT name FROM customers ORDER BY id LIMIT 3", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"
    assert srv.count("POST", "/api/generate") == 1  # the request went through the loopback proxy
    assert srv.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    warning = ("WARNING: API_KEY (a bearer token) would be sent in clear over plain HTTP to http://203.0.113.10:8000: "
               "anyone on the network between this laptop and the server can read and reuse it.")
    assert result.stderr.count(warning) == 1, result.stderr
    assert result.stderr.count("would be sent in clear") == 1
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert log.count("would be sent in clear over plain HTTP to http://203.0.113.10:8000") == 1
    assert KEY not in result.stderr and KEY not in log


def test_check_warns_about_the_key_and_the_public_address(run, through_loopback_proxy):
    _, env = through_loopback_proxy
    result = run("--check", env=env)
    assert result.returncode == 0, result.stdout
    assert ("[WARN] link: API_KEY (a bearer token) would be sent in clear over plain HTTP to "
            "http://203.0.113.10:8000") in result.stdout
    assert ("[WARN] link: the model server http://203.0.113.10:8000 is reached over plain HTTP at an address outside "
            "the private ranges") in result.stdout
    assert "       Fix: reach the server over HTTPS" in result.stdout
    assert "       Fix: use the PC's LAN address, or HTTPS" in result.stdout
    assert KEY not in result.stdout and KEY not in result.stderr


def test_check_is_quiet_about_a_loopback_server(run):
    with FakePCServer() as srv:
        result = run("--check", env={"API_BASE_URL": srv.base_url, "API_KEY": KEY})
    assert result.returncode == 0, result.stdout
    assert "[WARN] link" not in result.stdout and "in clear" not in result.stderr


def test_several_servers_each_warned_once_per_run_and_check_says_it_once(run, through_loopback_proxy, tmp_path):
    srv, env = through_loopback_proxy
    env = {**env, "API_BASE_URL": "http://203.0.113.10:8000,http://bob:pw-Sentinel@203.0.113.11:8000"}
    first = run("--query", "SELECT name FROM customers ORDER BY id LIMIT 3", env=env)
    second = run("--query", "SELECT name FROM customers ORDER BY id LIMIT 3", env=env)
    check = run("--check", env=env)
    assert first.returncode == second.returncode == check.returncode == 0, (first.stderr, check.stdout)
    for result in (first, second):  # each run says it once per server, on stderr
        assert result.stderr.count("in clear over plain HTTP to http://203.0.113.10:8000") == 1, result.stderr
        assert result.stderr.count("in clear over plain HTTP to http://203.0.113.11:8000") == 1, result.stderr
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert log.count("in clear over plain HTTP to http://203.0.113.11:8000") == 2  # the two runs
    # --check says it once per server, as a [WARN] line, not a second time on stderr
    assert check.stdout.count("[WARN] link: API_KEY (a bearer token) would be sent in clear") == 1, check.stdout
    assert check.stdout.count("[WARN] link: API_KEY (a bearer token) and the user name and password") == 1
    assert "in clear" not in check.stderr, check.stderr
    for text in (first.stderr, second.stderr, check.stdout, check.stderr, log):
        assert KEY not in text and "pw-Sentinel" not in text
