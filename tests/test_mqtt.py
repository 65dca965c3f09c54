"""What the link relies on from paho and Mosquitto, checked against them.

paho's keep-alive: a broker that keeps sending is not dropped. Mosquitto always answers a PINGREQ, so a minimal MQTT 3.1.1 server stands in for a broker too
busy to answer it: it accepts one client, never sends a PINGRESP, and either sends a QoS 0
message every 0.1 s or nothing at all. paho 2.2 pings every keep-alive period even while packets
flow (paho #813); it must keep the busy link and close the silent one ("keep alive timeout").
An account of a 60 s overload run's disconnect rested on this (README.md history, commit 042a5d7).
"""

from __future__ import annotations

import queue
import socket
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.mqtt import MqttLink
from tests.conftest import Broker, Collector, Relay
from tests.helpers import link_config, mqtt_client

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


def unacked_received(broker: Broker, prefix: str, publish: int, ack_first: int) -> list[int]:
    """One connection of a persistent MQTT 5 session with Receive Maximum 5: the messages it got
    in 1.5 s, acknowledging only the first ``ack_first``; ``publish`` messages are sent first."""
    got: list[int] = []

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        got.append(int(message.payload))
        if len(got) <= ack_first:
            client.ack(message.mid, message.qos)

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-sub",
        protocol=paho.MQTTv5,
        manual_ack=True,
    )
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/t", 1)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 600
    properties.ReceiveMaximum = 5
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    assert subscribed.wait(10)
    with mqtt_client(broker, f"{prefix}-pub") as sender:
        for k in range(publish):
            sender.publish(f"{prefix}/t", str(k), qos=1).wait_for_publish(5)
        time.sleep(1.5)
    client.loop_stop()
    client.socket().close()  # the link breaks: the session stays with the broker
    return got


def test_mosquitto_receive_maximum_fresh_and_resumed(broker: Broker, prefix: str) -> None:
    """Back-pressure's flow control: Mosquitto keeps to Receive Maximum on a fresh session.

    On the resumed one, Mosquitto 2.0.11 resends the 5 unacknowledged messages and, once they are
    acknowledged, sends more than 5 more (printed; docs/operations.md cites the behaviour).
    """
    fresh = unacked_received(broker, prefix, publish=100, ack_first=0)
    assert fresh == [0, 1, 2, 3, 4]
    resumed = unacked_received(broker, prefix, publish=0, ack_first=5)
    assert resumed[:5] == fresh  # resent first
    print(f"resumed session, Receive Maximum 5, 5 acknowledged: {len(resumed)} received")


def test_qos0_forecasts_unwritten_when_the_link_breaks_are_handed_back(
    broker: Broker, prefix: str
) -> None:
    """paho forgets QoS 0 messages it had queued but not written when the link breaks; the
    link hands them back (``settle()``) and they arrive once published again.

    The link stalls (a relay stops carrying its bytes), so 1 MB payloads fill the socket buffers
    and the rest wait in paho's queue; then the link is cut and comes back.
    """
    relay = Relay(broker)
    config = link_config(relay, prefix, reconnect_min_delay=0.5, reconnect_max_delay=1)
    link = MqttLink(config, queue.Queue(maxsize=10))
    link.start()
    out = Collector(broker, f"{prefix}/out/+", qos=0)
    try:
        assert link.is_subscribed.wait(10)
        relay.stall()
        payloads = [bytes([65 + k]) * 1_000_000 for k in range(30)]
        for payload in payloads:
            assert link.publish(f"{prefix}/out/s", payload, 0)
        relay.cut(down_for=0.5)
        deadline = time.monotonic() + 20
        while link.connects < 2:
            assert time.monotonic() < deadline, "no reconnect"
            time.sleep(0.05)
        lost = link.settle()
        print(f"{len(lost)} of {len(payloads)} payloads unwritten at the cut, handed back")
        assert lost, "the socket buffers took every payload: nothing was left unwritten"
        assert [p for _, p, _ in lost] == payloads[len(payloads) - len(lost) :]  # the last ones
        # Published again as the outbox does it: one the link refuses (offline again: on a loaded
        # machine the new connection can drop too) is kept and retried, and any that paho loses
        # again is handed back by settle() and published again, in order.
        wanted = [p for _, p, _ in lost]
        pending, deadline = list(lost), time.monotonic() + 60
        while True:
            while pending:
                assert time.monotonic() < deadline, "the handed-back payloads were never taken"
                if link.publish(*pending[0]):
                    pending.pop(0)
                else:
                    time.sleep(0.05)
                pending = link.settle() + pending
            settled = time.monotonic() + 10
            while (arrived := [p for _, p, _ in out.wait_raw(0) if p in wanted]) != wanted:
                if time.monotonic() > settled:
                    break
                time.sleep(0.05)
            pending = link.settle()
            if arrived == wanted or not pending:
                break
        assert arrived == wanted  # each once, in order
    finally:
        out.close()
        link.close()
        relay.close()


def test_a_corked_burst_reaches_the_broker_whole_in_a_few_segments(
    broker: Broker, prefix: str
) -> None:
    """A tick's forecasts published inside ``corked()`` arrive complete and in order, in a few
    reads at the far end instead of about one per message; the socket is uncorked after."""
    relay = Relay(broker)
    link = MqttLink(link_config(relay, prefix), queue.Queue(maxsize=10))
    link.start()
    out = Collector(broker, f"{prefix}/out/+", qos=0)
    try:
        assert link.is_subscribed.wait(10)
        time.sleep(0.2)  # the subscribe's bytes are counted before the burst
        before = relay.reads
        payloads = [f"forecast {k}".encode() for k in range(200)]
        with link.corked():
            for payload in payloads:
                assert link.publish(f"{prefix}/out/s", payload, 0)
            time.sleep(0.05)  # corked: nothing leaves yet
            assert relay.reads == before
        got = out.wait_raw(len(payloads), timeout=10)
        assert [p for _, p, _ in got] == payloads
        assert relay.reads - before <= 5, relay.reads - before  # 200 messages, ~3 KB
        sock = link.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    finally:
        out.close()
        link.close()
        relay.close()
