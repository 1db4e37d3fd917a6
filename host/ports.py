"""Host code. Free TCP ports for the servers tests, the demo and the HIL rig start.

Every server this project starts listens on 127.0.0.1 on a port the kernel hands out, never
on a well-known one: a system Mosquitto may already own 1883.
"""

from __future__ import annotations

import socket


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago.

    The kernel picks the port (bind to 0); the socket is closed before returning, so another
    process could take the port in between. The window is small, and callers that start a
    server on it get an "address in use" error they can report, never a silent clash.

    :raises OSError: if `host` is not a local address this machine can bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
