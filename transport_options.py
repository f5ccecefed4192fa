"""How the transport talks to one server: timeouts, retries, limits, credentials and TLS trust.

Plain data, with no ``requests``: the settings (``server_client.transport_options``) or a
server pool build one per server, and :class:`http_transport.HttpTransport` (which re-exports
it) follows it. Per-server differences are ``dataclasses.replace(options, ca_bundle=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retry_policy import RetryPolicy

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TransportOptions:
    """How to talk to one server. Field names follow the settings they come from."""

    connect_timeout: float = 5.0  # API_CONNECT_TIMEOUT
    read_timeout: float = 300.0  # API_TIMEOUT: whole non-streamed answer; silence between streamed pieces
    health_timeout: float = 5.0  # API_HEALTH_TIMEOUT: probes and health checks
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # API_MAX_ATTEMPTS, API_RETRY_AFTER_MAX
    use_env_proxy: bool = False  # API_USE_ENV_PROXY
    api_key: str | None = field(default=None, repr=False)  # API_KEY, sent as a bearer token; never logged
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # API_MAX_RESPONSE_BYTES
    stream_max_seconds: float = 0.0  # API_STREAM_MAX_SECONDS; 0 = no total limit for a stream
    # TLS: a PEM file of CAs trusted for this server on top of the system's and certifi's
    # (API_CA_BUNDLE, or the server's own #ca=PATH); None: those alone. Checked when the
    # first https session is built (ConfigError naming the file).
    ca_bundle: str | None = None
