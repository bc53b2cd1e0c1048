"""Checking a Ray address before ``ray.init`` is given it.

``ray.init`` waits a long time for an address that does not answer: 30 s for a Ray
Client address (``ray://host:port``), minutes of retries for a GCS address
(``host:port``). A TCP connection tells within seconds whether anything listens.
"""

from __future__ import annotations

import socket

CONNECT_TIMEOUT_S = 10.0
LOCAL_NAMES = ("auto", "local")  # Ray resolves these itself


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``ray://host:port``, ``http(s)://host:port`` or ``host:port``;
    None for the names Ray resolves itself ("auto", "local") or other schemes."""
    address = address.strip()
    if address in LOCAL_NAMES:
        return None
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme not in ("", "ray", "http", "https"):
        return None
    host, colon, port = rest.split("/", 1)[0].rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"Ray address {address!r} is not host:port or ray://host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConnectionError naming ``address`` unless something accepts a TCP connection
    there within ``timeout_s``."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e} "
                              f"(a TCP connection to {target[0]}:{target[1]} within {timeout_s:g}s); "
                              "check the address, that Ray runs there and that the port is open "
                              "to this machine") from None
