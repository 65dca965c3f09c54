"""A connected paho client for the simulators (QoS>0 publishes wait for room, never vanish)."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def connected_client(
    host: str, port: int, client_id: str, timeout: float = 30.0, inflight: int = 20
) -> paho.Client:
    """Connect (retrying until ``timeout`` while the broker starts) and run the network loop;
    ``inflight``: QoS 1 messages sent before their acknowledgements (paho's default 20)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id}-{time.time_ns()}")
    client.max_inflight_messages_set(inflight)
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect(host, port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client.loop_start()
    return client
