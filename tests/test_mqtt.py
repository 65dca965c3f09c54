"""paho's keep-alive, which the link relies on: a broker that keeps sending is not dropped.

Mosquitto always answers a PINGREQ, so a minimal MQTT 3.1.1 server stands in for a broker too
busy to answer it: it accepts one client, never sends a PINGRESP, and either sends a QoS 0
message every 0.1 s or nothing at all. paho 2.2 pings every keep-alive period even while packets
flow (paho #813); it must keep the busy link and close the silent one ("keep alive timeout").
The README's account of the 60 s overload run's disconnect rests on this.
"""

from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

CONNACK = b"\x20\x02\x00\x00"  # MQTT 3.1.1, session not present, accepted
TOPIC = b"busy/broker"
PUBLISH = bytes([0x30, 2 + len(TOPIC) + 2, 0, len(TOPIC)]) + TOPIC + b"42"  # QoS 0


class UnansweredPings:
    """Accepts one client and never answers its PINGREQs; ``busy``: sends it a PUBLISH every 0.1 s."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        conn.recv(4096)  # CONNECT
        conn.sendall(CONNACK)
        conn.settimeout(0.1)
        while not self.stop.is_set():
            try:
                if self.busy:
                    conn.sendall(PUBLISH)
                if conn.recv(4096) == b"":  # PINGREQs are read and left unanswered
                    return  # the client closed the link
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.mark.parametrize("busy", [True, False])
def test_unanswered_pings_close_only_a_silent_link(busy: bool) -> None:
    server = UnansweredPings(busy)
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.reconnect_delay_set(60, 60)  # one connection only
    lost: list[str] = []
    received: list[bytes] = []
    client.on_disconnect = lambda c, u, flags, reason, p: lost.append(str(reason))
    client.on_message = lambda c, u, message: received.append(message.payload)
    client.connect("127.0.0.1", server.port, keepalive=1)
    client.loop_start()
    time.sleep(3.5)  # pings at about 1, 2 and 3 s
    client.loop_stop()
    server.close()
    if busy:
        assert received and lost == []
    else:
        assert lost and "keep alive" in lost[0].lower(), lost
