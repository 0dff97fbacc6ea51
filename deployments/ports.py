"""TCP ports on loopback for the demo's HTTP, tests and benchmarks.

`free_port` only asks the OS for a port that is free now: it is released before the caller
binds it, so another process may take it first. For Serve's HTTP proxy use `reserved_port`,
which holds the port until the proxy listens on it, and `listening_pids` to read back who does.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process could still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A free port held for the `with` block by a bound socket that never listens.

    The socket sets SO_REUSEPORT, so a server of this same user that binds with SO_REUSEPORT too
    (Ray Serve's proxies do, unless SERVE_SOCKET_REUSE_PORT_ENABLED=0) binds the port meanwhile;
    any other bind of it fails, and the OS hands it to no one's bind(0). A socket that does not
    listen is given no connections: once the server listens, every connection is the server's.
    Leave the block after the server listens (`listening_pids`); the port is the server's then.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def listening_pids(port: int) -> set[int]:
    """The processes with a TCP socket listening on `port` (any address). Needs to see their
    sockets: the same user's processes, or all of them as root."""
    return {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid is not None
    }


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` ("127.0.0.1", "0.0.0.0", "::"...):
    whether a server is reachable from this machine only. Same visibility rule as `listening_pids`."""
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }


def start_serve_on_a_free_port(host: str = "127.0.0.1", **serve_start: Any) -> int:
    """`serve.start` with its HTTP proxy on a port no other process can take meanwhile; the port.

    The port is held (`reserved_port`) until `serve.start` returns, by which time the proxy
    listens on it (Serve waits for the proxy's `ready`, which binds the socket)."""
    from ray import serve

    with reserved_port(host) as port:
        serve.start(http_options={"host": host, "port": port}, **serve_start)
    return port
