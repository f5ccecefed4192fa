"""HTTPS to the model servers: real TLS servers on 127.0.0.1 with certificates from a throwaway
CA made here (trustme), ``API_CA_BUNDLE`` and a per-server ``TransportOptions.ca_bundle``, and
the TLS_ERROR a refused certificate gives (unknown CA, another host name, expired)."""

from __future__ import annotations

import dataclasses
import datetime
import ssl
import threading
from pathlib import Path

import certifi
import pytest
import trustme

import config
import tls
from errors import ConfigError, ExitCode, ModelConnectionError, ModelTLSError
from fake_ollama_server import FakeOllamaServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER
from http_transport import HttpTransport, TransportOptions
from model_clients import Sleeps, drain, make_client, settings_for
from server_client import ServerClient, transport_options
from test_pipeline import run  # noqa: F401 - the command-line fixture

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


class Pki:
    """A throwaway CA, its certificate as a PEM file, and server contexts holding certificates it issued."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.ca = trustme.CA()
        self.bundle = str(folder / f"{name}.pem")
        self.ca.cert_pem.write_to_path(self.bundle)

    def server(self, *names: str, expired: bool = False) -> ssl.SSLContext:
        window = {"not_before": NOW - 10 * DAY, "not_after": NOW - DAY} if expired else {}
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(names or ("127.0.0.1", "localhost")), **window).configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki2"), "other-ca")


# --- trust: the bundle on top of the public CAs ---------------------------------------------


def test_the_bundle_is_trusted_on_top_of_certifis_and_the_systems_cas(pki):
    certifi_only = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certifi_only.load_verify_locations(cafile=certifi.where())
    context = tls.trust_context(pki.bundle)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = [dict(part[0] for part in cert["subject"]) for cert in context.get_ca_certs()]
    assert any(subject.get("organizationName", "").startswith("trustme") for subject in subjects)
    assert context.cert_store_stats()["x509_ca"] > certifi_only.cert_store_stats()["x509_ca"]
    assert tls.trust_context(pki.bundle) is context  # built once per file


def test_the_systems_cas_stay_trusted_next_to_the_bundle(tmp_path, monkeypatch, pki):
    # A CA in the system's store (as `mkcert -install` puts it there), named through OpenSSL's own
    # SSL_CERT_FILE; a fresh bundle file, so that the context is built under it.
    system = Pki(tmp_path, "system-ca")
    monkeypatch.setenv("SSL_CERT_FILE", system.bundle)
    bundle = Pki(tmp_path, "private-ca")
    with FakePCServer(tls=system.server()) as by_system, FakePCServer(tls=bundle.server()) as by_bundle, \
            FakePCServer(tls=pki.server()) as by_neither:
        settings = settings_for(by_system.base_url, API_CA_BUNDLE=bundle.bundle)
        assert ServerClient(settings).generate("질문").text == DEFAULT_ANSWER
        assert ServerClient(settings, by_bundle.base_url).generate("질문").text == DEFAULT_ANSWER
        with pytest.raises(ModelTLSError):
            ServerClient(settings, by_neither.base_url).generate("질문")


def test_https_answers_with_the_bundle_and_is_refused_without_it(pki):
    with FakePCServer(tls=pki.server()) as srv:
        assert srv.base_url.startswith("https://127.0.0.1:")
        text, stats = make_client(srv.base_url, API_CA_BUNDLE=pki.bundle).generate("질문")
        assert text == DEFAULT_ANSWER and stats["server"] == srv.base_url
        sleeps = Sleeps()
        with pytest.raises(ModelTLSError) as caught:
            make_client(srv.base_url, sleep=sleeps).generate("질문")
    error = caught.value
    assert isinstance(error, ModelConnectionError)  # nothing was sent: another server may take it
    assert error.code == "TLS_ERROR" and error.exit_code == ExitCode.MODEL_UNREACHABLE
    assert f"model server at {srv.base_url}: its certificate is not signed by a CA this client trusts" in error.message
    assert "API_CA_BUNDLE is not set" in error.message and "unable to get local issuer certificate" in error.message
    assert "set API_CA_BUNDLE" in error.hint and "#ca=PATH" in error.hint and "rootCA.pem" in error.hint
    assert sleeps.calls == []  # a certificate does not change by waiting: not retried
    assert srv.count("POST") == 1  # only the run with the bundle reached the server


def test_a_certificate_for_another_host_name_is_refused(pki):
    with FakePCServer(tls=pki.server("pc.other.example")) as srv:
        with pytest.raises(ModelTLSError) as caught:
            make_client(srv.base_url, API_CA_BUNDLE=pki.bundle).generate("질문")
    assert "its certificate is not valid for the name 127.0.0.1" in caught.value.message
    assert "mkcert 127.0.0.1" in caught.value.hint
    assert srv.requests == []


def test_localhost_needs_a_certificate_naming_localhost(pki):
    with FakePCServer(tls=pki.server("127.0.0.1")) as srv:
        url = srv.base_url.replace("127.0.0.1", "localhost")
        with pytest.raises(ModelTLSError, match="not valid for the name localhost"):
            make_client(url, API_CA_BUNDLE=pki.bundle).generate("질문")


def test_an_expired_certificate_is_refused(pki):
    with FakePCServer(tls=pki.server(expired=True)) as srv:
        with pytest.raises(ModelTLSError) as caught:
            make_client(srv.base_url, API_CA_BUNDLE=pki.bundle).generate("질문")
    assert "its certificate has expired" in caught.value.message
    assert "date and time" in caught.value.hint


def test_https_to_a_plain_http_server_says_it_does_not_speak_tls():
    with FakePCServer() as srv:
        with pytest.raises(ModelTLSError) as caught:
            make_client(srv.base_url.replace("http://", "https://"), API_PROTOCOL="pc").generate("질문")
    assert "did not answer in TLS: a plain-HTTP server, or the wrong port" in caught.value.message
    assert "use http://" in caught.value.hint


def test_requests_ca_bundle_from_the_environment_is_not_read(pki, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.bundle)
    monkeypatch.setenv("CURL_CA_BUNDLE", pki.bundle)
    with FakePCServer(tls=pki.server()) as srv:
        with pytest.raises(ModelTLSError, match="API_CA_BUNDLE is not set"):
            make_client(srv.base_url).generate("질문")


def test_streaming_and_many_threads_over_tls(pki):
    with FakeOllamaServer(tls=pki.server(), piece_delay=0.01) as srv:
        client = make_client(srv.base_url, API_CA_BUNDLE=pki.bundle)
        pieces, stats, error = drain(client.stream("질문"))
        assert error is None and "".join(pieces) == DEFAULT_ANSWER and stats["protocol"] == "ollama"
        answers: list[str] = []

        def ask() -> None:
            answers.append(client.generate("질문")[0])

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert answers == [DEFAULT_ANSWER] * 4


def test_health_check_reports_the_certificate_problem_without_raising(pki):
    with FakePCServer(tls=pki.server()) as srv:
        report = make_client(srv.base_url).check_health()
    assert not report.ok and not report.reachable
    assert "not signed by a CA this client trusts" in report.detail and "API_CA_BUNDLE" in report.fix


# --- a bundle per server, through TransportOptions ----------------------------------------


def test_a_per_server_bundle_through_transport_options_replaces_the_global_one(pki, other_pki):
    with FakePCServer(tls=pki.server()) as first, FakePCServer(tls=other_pki.server()) as second:
        settings = settings_for(first.base_url, API_CA_BUNDLE=pki.bundle)
        options = transport_options(settings)
        assert options.ca_bundle == pki.bundle  # the global setting reaches the transport
        assert ServerClient(settings).generate("질문").text == DEFAULT_ANSWER
        # The second server's own bundle (a pool sets it from #ca=PATH after that server's URL):
        own = HttpTransport(second.base_url, dataclasses.replace(options, ca_bundle=other_pki.bundle))
        assert ServerClient(settings, second.base_url, transport=own).generate("질문").text == DEFAULT_ANSWER
        with pytest.raises(ModelTLSError, match=f"trusted: the system's CAs and {pki.bundle}"):
            ServerClient(settings, second.base_url).generate("질문")  # the global CA did not sign it
        direct = HttpTransport(first.base_url, TransportOptions(ca_bundle=pki.bundle))
        assert direct.get("/api/health").status == 200


# --- a bad bundle is a configuration error naming the setting and the file ------------------


def _bad_bundles(folder: Path) -> dict[str, tuple[str, str]]:
    garbage = folder / "notes.txt"
    garbage.write_text("this is not a certificate\n", encoding="utf-8")
    key = folder / "ca-key.pem"
    key.write_bytes(trustme.CA().private_key_pem.bytes())
    der = folder / "root.cer"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(trustme.CA().cert_pem.bytes().decode("ascii")))
    broken = folder / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", encoding="ascii")
    return {
        "missing": (str(folder / "nowhere.pem"), "does not exist"),
        "folder": (str(folder), "is a folder, not a PEM file"),
        "text": (str(garbage), "holds no PEM certificate"),
        "key": (str(key), "holds a private key, not a certificate"),
        "der": (str(der), "is a binary (DER) certificate, not PEM"),
        "broken": (str(broken), "is not a valid PEM certificate file"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "text", "key", "der", "broken"])
def test_a_bad_bundle_is_a_config_error_naming_the_setting_and_file(tmp_path, case):
    path, problem = _bad_bundles(tmp_path)[case]
    assert problem in (tls.ca_bundle_problem(path) or "")
    with pytest.raises(ConfigError) as caught:
        config.load_settings({"API_CA_BUNDLE": path}, environ={})
    assert f"API_CA_BUNDLE must be a PEM file of CA certificates ({path} {problem}" in caught.value.message


def test_a_bad_per_server_bundle_fails_on_first_use_naming_the_file(tmp_path):
    missing = str(tmp_path / "nowhere.pem")
    with FakePCServer() as srv:
        transport = HttpTransport(srv.base_url.replace("http://", "https://"), TransportOptions(ca_bundle=missing))
        with pytest.raises(ConfigError, match=f"The CA bundle {missing} .* does not exist"):
            transport.get("/api/health")
    assert srv.requests == []


def test_server_client_reports_a_bad_bundle_from_its_health_check(tmp_path, pki):
    with FakePCServer(tls=pki.server()) as srv:
        settings = settings_for(srv.base_url)
        broken = HttpTransport(srv.base_url, dataclasses.replace(transport_options(settings),
                                                                 ca_bundle=str(tmp_path / "gone.pem")))
        report = ServerClient(settings, transport=broken).check_health()
    assert not report.reachable and "gone.pem" in report.detail and "does not exist" in report.detail


# --- the command line ---------------------------------------------------------------------


def test_pipeline_over_https_with_api_ca_bundle(run, pki):
    with FakePCServer(tls=pki.server()) as srv:
        result = run("--query", "SELECT 1 AS test", env={"API_BASE_URL": srv.base_url, "API_CA_BUNDLE": pki.bundle})
    assert result.returncode == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"


@pytest.mark.parametrize(("server_names", "expired", "bundle", "words"), [
    ((), False, False, "its certificate is not signed by a CA this client trusts"),
    (("pc.other.example",), False, True, "its certificate is not valid for the name 127.0.0.1"),
    ((), True, True, "its certificate has expired"),
], ids=["unknown-ca", "other-name", "expired"])
def test_pipeline_certificate_failures_exit_5_with_the_reason(run, pki, server_names, expired, bundle, words):
    env = {"API_CA_BUNDLE": pki.bundle} if bundle else {}
    with FakePCServer(tls=pki.server(*server_names, expired=expired)) as srv:
        result = run("--query", "SELECT 1 AS test", env={"API_BASE_URL": srv.base_url, **env})
    assert result.returncode == 5, result.stderr
    assert f"Error [TLS_ERROR]: Cannot connect securely to the model server at {srv.base_url}: {words}" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert srv.requests == []


def test_pipeline_with_a_missing_bundle_exits_2_naming_it(run, tmp_path):
    missing = str(tmp_path / "caddy-root.crt")
    result = run("--query", "SELECT 1", env={"API_BASE_URL": "https://127.0.0.1:9", "API_CA_BUNDLE": missing})
    assert result.returncode == 2
    assert f"API_CA_BUNDLE must be a PEM file of CA certificates ({missing} does not exist)" in result.stderr


def test_check_over_https(run, pki):
    with FakePCServer(tls=pki.server()) as srv:
        good = run("--check", env={"API_BASE_URL": srv.base_url, "API_CA_BUNDLE": pki.bundle})
        refused = run("--check", env={"API_BASE_URL": srv.base_url})
    assert good.returncode == 0, good.stdout
    assert f"[ OK ] TLS: {srv.base_url}: its certificate must be signed by the system's CAs and {pki.bundle}" in good.stdout
    assert "[ OK ] model server" in good.stdout
    assert refused.returncode == 5
    assert f"[FAIL] model server: {srv.base_url}: unreachable: Cannot connect securely" in refused.stdout
    assert "Fix: set API_CA_BUNDLE" in refused.stdout


def test_check_warns_about_a_bundle_on_a_plain_http_url(run, pki):
    with FakePCServer() as srv:
        result = run("--check", env={"API_BASE_URL": srv.base_url, "API_CA_BUNDLE": pki.bundle})
    assert result.returncode == 0, result.stdout
    assert f"[WARN] TLS: API_CA_BUNDLE is set but {srv.base_url} is plain HTTP" in result.stdout


def test_several_https_servers_each_trusted_through_its_own_ca(run, pki, other_pki):
    """API_CA_BUNDLE for one server, ``#ca=PATH`` for another whose CA differs: both answer."""
    with FakePCServer(tls=pki.server(), serial=False) as pc, FakeOllamaServer(tls=other_pki.server()) as ollama:
        env = {"API_BASE_URL": f"{pc.base_url},{ollama.base_url}#ca={other_pki.bundle}&slots=2",
               "API_CA_BUNDLE": pki.bundle}
        check = run("--check", env=env)
        answers = [run("--query", "SELECT 1 AS test", env=env) for _ in range(6)]
        without = run("--check", env={**env, "API_BASE_URL": f"{pc.base_url},{ollama.base_url}"})
    assert check.returncode == 0, check.stdout
    assert f"[ OK ] TLS: {pc.base_url}: its certificate must be signed by the system's CAs and {pki.bundle}" in check.stdout
    assert (f"[ OK ] TLS: {ollama.base_url}: its certificate must be signed by the system's CAs and "
            f"{other_pki.bundle}") in check.stdout
    assert "[ OK ] model servers: 2 of 2 ready; together they run 3 generations at once" in check.stdout
    assert all(result.returncode == 0 and result.stdout == DEFAULT_ANSWER + "\n" for result in answers)
    assert len(pc.answered) + len(ollama.answered) == 6
    # Without #ca= the second server's certificate is refused, and the first one does the work.
    assert without.returncode == 0, without.stdout
    assert f"[WARN] model server: {ollama.base_url}: unreachable: Cannot connect securely" in without.stdout
