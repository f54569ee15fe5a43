"""Where dp360's servers listen (the field viewer, `dp360 view`; the web app, `dp360 app`): the
host and port checked before any work, so that a bad or taken address is one sentence."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from .errors import Dp360Error

DEFAULT_HOST = "127.0.0.1"
MAX_PORT = 65535


@dataclass(frozen=True)
class ServerAddress:
    """Where a server of dp360 listens (`port` is never 0 here: 0 asks for a free port, chosen by
    `check_address`)."""

    host: str
    port: int
    loopback: bool  # reachable from this machine only

    @property
    def url(self) -> str:
        """The address to open in a browser on this machine."""
        host = self.host
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:  # listening everywhere: this machine reaches it over loopback
                host = "127.0.0.1" if address.version == 4 else "::1"
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def network_note(self, what: str = "the viewer") -> str | None:
        """What to tell the user when other machines can reach `what`; None on loopback."""
        if self.loopback:
            return None
        return (
            f"{what} listens on {self.host}, so other machines on the network can open it at "
            f"http://{socket.gethostname()}:{self.port} (or this machine's address); "
            f"use --host {DEFAULT_HOST} to keep it to this machine."
        )


def _resolved(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, socket address) of every address `host` names, as a server binds them."""
    if not isinstance(host, str) or not host.strip():
        raise Dp360Error(f"--host must name an address of this machine, not {host!r}; use {DEFAULT_HOST}.")
    try:
        found = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise Dp360Error(
            f"--host {host} is not an address or name this machine can resolve ({reason}); "
            f"use {DEFAULT_HOST} (this machine only) or 0.0.0.0 (every network interface)."
        ) from None
    unique: dict[tuple, int] = {}
    for family, _, _, _, address in found:
        if family in (socket.AF_INET, socket.AF_INET6):
            unique.setdefault(address[:2], family)
    return [(family, address) for address, family in unique.items()]


def _try_bind(family: int, address: tuple, host: str) -> int:
    """Binds a throw-away socket the way the server will (address reuse on, IPv6 only for IPv6)
    and returns the port it got; a refusal becomes one sentence."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as error:
            port = address[1]
            if error.errno == errno.EADDRINUSE:
                raise Dp360Error(
                    f"Port {port} on {host} is already in use; stop what uses it or choose another with --port "
                    "(0 picks a free one)."
                ) from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise Dp360Error(
                    f"--host {host} is not an address of this machine; use {DEFAULT_HOST} (this machine only) "
                    "or 0.0.0.0 (every network interface)."
                ) from None
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise Dp360Error(
                f"Cannot listen on {host} port {port} ({reason.lower()}); choose another with --port "
                "(ports below 1024 need administrator rights)."
            ) from None
        return probe.getsockname()[1]


def check_address(host: str, port: int) -> ServerAddress:
    """A server's address, checked before any work: `port` 1 to 65535 and free on every address
    `host` names (0: pick a free one), `host` an address or name of this machine."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise Dp360Error(f"--port must be 1 to {MAX_PORT} (or 0 to pick a free one), not {port!r}.")
    addresses = _resolved(host, port)
    if not addresses:
        raise Dp360Error(f"--host {host} names no IPv4 or IPv6 address; use {DEFAULT_HOST}.")
    if port == 0:
        family, address = addresses[0]
        port = _try_bind(family, address, host)
        addresses = [(family, (address[0], port, *address[2:])) for family, address in addresses]
    for family, address in addresses:
        _try_bind(family, address, host)
    loopback = all(ipaddress.ip_address(address[0].split("%")[0]).is_loopback for _, address in addresses)
    return ServerAddress(host, port, loopback)
