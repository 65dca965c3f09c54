"""The broker link's socket and security: credentials, TLS, ``TCP_NODELAY``, ``TCP_CORK``.

``TCP_NODELAY`` is set on the socket: with Nagle on, p50 latency at 1k msg/s was 26 ms instead of
0.4 ms on these machines. A tick's forecasts are corked into as few TCP segments as possible.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho

from forecaster.config import MqttConfig
from forecaster.errors import ConfigError


def _network_thread_writes(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Registered so that paho leaves socket writes to its network thread (see ``secure``)."""


def secure(client: paho.Client, config: MqttConfig) -> None:
    """Credentials (never logged) and TLS; a bad file is a ConfigError naming the key."""
    username, password = config.credentials()
    if username:
        client.username_pw_set(username, password)
    tls = config.tls
    if not tls.enabled:
        return
    try:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"mqtt.tls: cannot load the CA, certificate or key ({exc})") from None
    # paho writes a publish straight from the calling (engine) thread unless a write hook is
    # registered; an SSL socket must not be written by one thread while another reads it
    # (measured: the broker saw "unexpected eof" and the link dropped on the first forecast).
    # With this no-op hook paho wakes its own network thread, which does every write.
    client.on_socket_register_write = _network_thread_writes


def no_delay(sock: Any) -> None:
    """Nagle off on a newly opened socket (paho may hand over a non-TCP one: left alone)."""
    if hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def corked(client: paho.Client) -> Iterator[None]:
    """Publish a burst (a tick's forecasts) as few TCP segments instead of one per message.

    paho sends each publish at once, and with TCP_NODELAY every send() is a segment that the
    broker wakes up for. Corked, the sends only fill the socket buffer; uncorking sends them
    together (Linux's TCP_CORK; Linux also sends corked data after 200 ms). Elsewhere, or
    with no socket, a no-op.
    """
    sock = client.socket()
    cork = getattr(socket, "TCP_CORK", None)
    done = False
    if cork is not None and isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # closed by a reconnect meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
            done = True
    try:
        yield
    finally:
        if done:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)
