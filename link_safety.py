"""Is the link to a model server fit for what travels over it? Decisions as pure functions.

* :func:`credential_warning`: a bearer key (``API_KEY``) or ``user:password@`` in the URL would
  go over plain ``http://`` to something other than this machine.
* :func:`public_address_warning`: plain ``http://`` to an address outside the private ranges
  (10/8, 172.16/12, 192.168/16, link-local, loopback, and IPv6's loopback, link-local fe80::/10
  and unique-local fc00::/7).

Host names are judged without DNS, so a run never waits on a resolver: ``localhost`` (and
``*.localhost``) is loopback; any other name counts as "not this machine" for credentials, and
is only checked for a public address when a ``resolve`` function is passed (``--check`` passes
:func:`bounded_resolver`, which gives up after a second). Messages never carry the password.

A run says each warning once, however many clients, pools or checks meet the same server:
:func:`first_time` remembers what was said until :func:`new_run` (the command calls it as it starts;
a script's run is its process).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Callable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str], list[str]]

PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8",
    "::1/128", "fe80::/10", "fc00::/7",
))
SECURING = "the README's 'Securing the link to the PC'"

_said: set[str] = set()
_said_lock = threading.Lock()


def first_time(warning: str) -> bool:
    """True the first time this run meets ``warning`` (then it is remembered as said)."""
    with _said_lock:
        if warning in _said:
            return False
        _said.add(warning)
        return True


def new_run() -> None:
    """Forget which warnings were said: the next run says them again."""
    with _said_lock:
        _said.clear()


def ip_of(host: str) -> IPAddress | None:
    """The address a host literal names (IPv4-mapped IPv6 as IPv4, a zone id dropped), or None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost``, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = ip_of(name)
    return bool(address is not None and address.is_loopback)


def is_private_address(address: IPAddress) -> bool:
    """Inside the private, link-local or loopback ranges (the LAN, or this machine)."""
    return any(address in net for net in PRIVATE_NETWORKS if net.version == address.version)


def _server(url: str) -> str:
    """``http://host:port`` without any user name or password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def credential_warning(url: str, has_api_key: bool) -> str | None:
    """A warning when credentials would cross the network in clear text to ``url``; None when they would not.

    Credentials are ``API_KEY`` (sent as ``Authorization: Bearer``) and a user name or password
    in the URL (sent as HTTP basic authentication). No warning for https or for loopback.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or is_loopback_host(parts.hostname or ""):
        return None
    sent = []
    if has_api_key:
        sent.append("API_KEY (a bearer token)")
    if parts.username or parts.password:
        sent.append("the user name and password in the server's URL")
    if not sent:
        return None
    them = "them" if len(sent) > 1 else "it"
    return (f"{' and '.join(sent)} would be sent in clear over plain HTTP to {_server(url)}: anyone on the network "
            f"between this laptop and the server can read and reuse {them}. Fix: reach the server over HTTPS (a TLS "
            f"reverse proxy on the PC, an https:// URL and API_CA_BUNDLE; see {SECURING}), or at least keep it on a "
            "LAN-only address (a private IP, its firewall rule limited to the local subnet).")


def public_address_warning(url: str, resolve: Resolve | None = None) -> str | None:
    """A warning when ``url`` is plain HTTP to an address outside the private ranges; else None.

    An IP literal is judged as it is. A host name is judged by ``resolve(name) -> [addresses]``
    when given (no answer: no warning); without it, names are not judged.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme.lower() != "http" or not host or is_loopback_host(host):
        return None
    literal = ip_of(host)
    if literal is not None:
        addresses = [literal]
    elif resolve is not None:
        addresses = [a for a in map(ip_of, resolve(host)) if a is not None]
    else:
        return None
    public = [a for a in addresses if not is_private_address(a)]
    if not public:
        return None
    shown = _server(url) if literal is not None else f"{_server(url)} ({', '.join(map(str, public))})"
    return (f"the model server {shown} is reached over plain HTTP at an address outside the private ranges "
            "(10/8, 172.16/12, 192.168/16, link-local, loopback, IPv6 fc00::/7): prompts, query results and answers "
            "cross networks you do not control unencrypted, unless a VPN carries them. Fix: use the PC's LAN "
            f"address, or HTTPS through a TLS reverse proxy on the PC (see {SECURING}).")


def bounded_resolver(timeout: float = 1.0) -> Resolve:
    """A ``resolve(name)`` that waits at most ``timeout`` seconds for DNS, then answers [] (not known)."""

    def resolve(host: str) -> list[str]:
        found: list[str] = []

        def lookup() -> None:
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                return
            found.extend(str(info[4][0]) for info in infos)

        worker = threading.Thread(target=lookup, daemon=True, name="resolve-model-server")
        worker.start()
        worker.join(timeout)
        return [] if worker.is_alive() else found

    return resolve
