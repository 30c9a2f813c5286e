"""systemd's sd_notify protocol, without a dependency: a datagram to $NOTIFY_SOCKET.

``READY=1`` once the listener accepts and the scheduler runs (Type=notify), ``WATCHDOG=1`` from every
publishing pass (WatchdogSec restarts a bridge whose scheduler stopped), ``STOPPING=1`` on shutdown.
Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` to systemd; returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True
