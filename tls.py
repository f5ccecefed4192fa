"""TLS to the model servers: which CAs are trusted, and what a failed handshake means.

An HTTPS server is verified against the system's CAs, certifi's bundle (the one requests
trusts by default) and, when configured, one more PEM file: ``API_CA_BUNDLE`` for every server,
or a server's own bundle (``TransportOptions.ca_bundle``, from ``#ca=PATH`` after its URL). A
server whose certificate comes from a private CA (Caddy's ``tls internal``, mkcert, a company CA)
is then reached without giving up the public CAs. The environment's ``REQUESTS_CA_BUNDLE`` is
not read: requests only reads it when it reads the environment at all, which the transport
turns off for the LAN (``API_USE_ENV_PROXY``).

Verification is never turned off here. Nothing in this module imports ``requests``: the
transport mounts :func:`trust_context` on its sessions and hands a failed handshake to
:func:`tls_error`.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from urllib.parse import urlsplit

from errors import ConfigError, ModelTLSError
from masking import mask_url_password

logger = logging.getLogger(__name__)

SETTING = "API_CA_BUNDLE"
MAX_BUNDLE_BYTES = 16 * 1024 * 1024  # the biggest public bundles are ~250 KB

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code carries them.
_UNTRUSTED = {2, 18, 19, 20, 21, 27}  # issuer unknown, self-signed, chain not anchored, untrusted
_SELF_SIGNED = 18
_NOT_YET_VALID, _EXPIRED = 9, 10
_NAME_MISMATCH = {62, 64}  # host name, IP address
# Words OpenSSL uses when the other side does not speak TLS at all (a plain HTTP server).
_NOT_TLS = ("wrong version number", "record layer failure", "unknown protocol", "http request", "packet length")

_contexts: dict[tuple[str, int, int] | None, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def ca_bundle_problem(path: str) -> str | None:
    """What is wrong with a CA bundle file ("does not exist" ...), or None when it holds a certificate."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a folder, not a PEM file"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if len(data) > MAX_BUNDLE_BYTES:
        return f"is larger than {MAX_BUNDLE_BYTES // (1024 * 1024)} MB: not a CA bundle"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        if b"PRIVATE KEY-----" in data:
            return "holds a private key, not a certificate (use the CA's certificate; never copy its key)"
        if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: a binary (DER) certificate, as Windows exports it
            return ("is a binary (DER) certificate, not PEM (convert it: "
                    "openssl x509 -inform der -in FILE -out FILE.pem)")
        return "holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        return f"is not a valid PEM certificate file ({getattr(exc, 'reason', None) or exc})"
    return None


def check_ca_bundle(path: str, setting: str = SETTING) -> None:
    """Raise ConfigError naming ``setting`` and the file when ``path`` is not a usable CA bundle."""
    problem = ca_bundle_problem(path)
    if problem:
        raise ConfigError(
            f"The CA bundle {path} ({setting}) {problem}.",
            hint=f"Fix: point {setting} at the PEM file of the CA that signed the model server's certificate "
            "(Caddy's root.crt, mkcert's rootCA.pem); see the README's 'Securing the link to the PC'.",
        )


def trust_context(ca_bundle: str | None = None, setting: str = SETTING) -> ssl.SSLContext:
    """A client SSLContext that verifies certificates and host names against the system's CAs,
    certifi's bundle and ``ca_bundle``. Built once per bundle file (and rebuilt when the file
    changes); safe to share between threads. Raises ConfigError for an unusable bundle."""
    key = None
    if ca_bundle:
        try:
            stat = os.stat(ca_bundle)
            key = (os.path.abspath(ca_bundle), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None
        with _contexts_lock:
            if key is not None and key in _contexts:  # every worker thread's session asks: checked once
                return _contexts[key]
        check_ca_bundle(ca_bundle, setting)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = _new_context(ca_bundle, setting)
    return context


def _new_context(ca_bundle: str | None, setting: str) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's CAs; CERT_REQUIRED and host name checks
    try:
        import certifi  # requests' own dependency: the CAs requests trusts by default

        context.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError, ssl.SSLError) as exc:
        logger.debug("certifi's CA bundle not loaded (%s); the system's CAs only", exc)
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (ssl.SSLError, OSError) as exc:  # changed since it was checked
            raise ConfigError(f"The CA bundle {ca_bundle} ({setting}) cannot be loaded: {exc}.",
                              hint=f"Fix: point {setting} at a PEM file of CA certificates.") from None
        logger.info("Trusting the CAs in %s on top of the system's (%s)", ca_bundle, setting)
    return context


def failure_kind(exc: BaseException) -> tuple[str, str]:
    """(kind, OpenSSL's words) for a failed handshake. Kinds: ``untrusted``, ``self-signed``,
    ``name``, ``expired``, ``not-yet-valid``, ``refused`` (another certificate problem),
    ``not-tls`` (the server does not speak TLS), ``handshake`` (anything else)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, words = exc.verify_code, str(exc.verify_message or exc.reason or exc)
        if code == _SELF_SIGNED:
            return "self-signed", words
        if code in _UNTRUSTED:
            return "untrusted", words
        if code in _NAME_MISMATCH:
            return "name", words
        if code == _EXPIRED:
            return "expired", words
        if code == _NOT_YET_VALID:
            return "not-yet-valid", words
        return "refused", words
    words = str(getattr(exc, "reason", None) or exc)
    if isinstance(exc, ValueError) and "match" in str(exc):  # urllib3's own host name check
        return "name", str(exc)
    if any(marker in words.lower() or marker in str(exc).lower() for marker in _NOT_TLS):
        return "not-tls", words
    return "handshake", str(exc)


def tls_error(url: str, exc: BaseException, ca_bundle: str | None) -> ModelTLSError:
    """The error for a failed HTTPS handshake with ``url``: what failed, and which setting cures it."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    server = mask_url_password(f"{parts.scheme}://{parts.netloc}")
    kind, words = failure_kind(exc)
    words = words.rstrip(".")
    trusted = "trusted: the system's CAs " + (f"and {ca_bundle}" if ca_bundle else "only; API_CA_BUNDLE is not set")
    bundle_fix = (
        "Fix: set API_CA_BUNDLE to the PEM file of the CA that signed the server's certificate (for one server "
        "of several: add #ca=PATH to its URL in API_BASE_URL): Caddy's root.crt (on the PC: "
        "%AppData%\\Caddy\\pki\\authorities\\local\\root.crt), mkcert's rootCA.pem (`mkcert -CAROOT`), or your "
        "company's CA. README: 'Securing the link to the PC'."
    )
    what, fix = {
        "untrusted": (f"its certificate is not signed by a CA this client trusts ({trusted})", bundle_fix),
        "self-signed": (f"its certificate is self-signed and not trusted here ({trusted})",
                        bundle_fix + " For a self-signed certificate, the certificate itself."),
        "name": (f"its certificate is not valid for the name {host}",
                 f"Fix: connect with a name or address the certificate was issued for (API_BASE_URL), or issue it "
                 f"for {host} (Caddy: the site address in the Caddyfile; mkcert: `mkcert {host}`)."),
        "expired": ("its certificate has expired",
                    "Fix: check the date and time on both machines, then renew the certificate on the server "
                    "(Caddy renews its own while it runs; mkcert: issue a new one)."),
        "not-yet-valid": ("its certificate is not valid yet",
                          "Fix: check the date and time on both machines (the laptop's clock may be behind)."),
        "refused": (f"its certificate was refused ({trusted})", bundle_fix),
        "not-tls": ("it did not answer in TLS: a plain-HTTP server, or the wrong port",
                    "Fix: use http:// for a server without TLS, or the port of the HTTPS proxy in front of it."),
    }.get(kind, ("the TLS handshake failed", "Fix: check that the server speaks HTTPS (TLS 1.2 or later) "
                 "on that port."))
    return ModelTLSError(f"Cannot connect securely to the model server at {server}: {what} (TLS: {words}).",
                         hint=fix + " Verification is never turned off.", url=url)
