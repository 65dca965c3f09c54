"""paho-mqtt 2.x link: connect/reconnect, subscribe -> bounded queue, publish forecasts, status.

Callbacks only convert and enqueue (as aiomqtt does); all work happens in the engine thread. paho
re-raises an exception from a callback and its network thread then dies silently (paho #894), so
every callback is wrapped: an exception is logged, counted and swallowed, and a watchdog restarts
the network loop if it ever stops. The socket's settings and TLS are ``transport``'s.

Inputs are acknowledged by hand (paho ``manual_ack``): the engine thread acks a message only after
its sample is journaled, so a crash leaves every unjournaled message with the broker, which
redelivers it to the persistent session (fixed client id, ``clean_start=False``, a session expiry).
A full receive queue either blocks this reader (back-pressure: unacked QoS 1 messages stay with the
broker, whose in-flight window stops sending) or drops the oldest or the newest message, counted.

Forecasts handed to paho are tracked until they have left (QoS 0: written) or been acknowledged
(QoS > 0): paho keeps QoS > 0 ones through a reconnect and sends them again, but silently forgets
QoS 0 ones still unwritten when the link breaks; ``settle()`` hands those back to be published
again, and ``outgoing`` lets the daemon stop taking input while too many are on their way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster import transport
from forecaster.config import MqttConfig, template_filter

log = logging.getLogger(__name__)

STATUS_ONLINE, STATUS_OFFLINE, STATUS_STOPPED = "online", "offline", "stopped"


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as the callback saw it; parsing happens on the engine thread."""

    topic: str
    payload: bytes
    received: float
    qos: int
    mid: int = 0  # packet id to acknowledge (QoS > 0)
    connection: int = 0  # which connection delivered it; acks never cross connections


class LinkEvents:
    """Hooks the link reports through (the metrics module implements them); no-ops by default."""

    def connected(self, up: bool) -> None: ...
    def reconnected(self) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def callback_error(self, callback: str) -> None: ...
    def loop_restarted(self) -> None: ...
    def backpressure(self) -> None: ...


def _is_settled(info: paho.MQTTMessageInfo) -> bool:
    """Left (QoS 0) or acknowledged (QoS > 0); paho's ``is_published()`` raises for a lost one."""
    return info._published


def _guarded(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Never let an exception escape into paho's network thread."""

    def wrap(method: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(method)
        def guarded(self: MqttLink, *args: Any) -> None:
            try:
                method(self, *args)
            except Exception:
                self.events.callback_error(name)
                log.exception("error in paho callback %s (counted, loop keeps running)", name)

        return guarded

    return wrap


class MqttLink:
    """One paho client: subscribes the input templates, publishes forecasts and status."""

    def __init__(
        self,
        config: MqttConfig,
        inbox: queue.Queue[RawMessage],
        events: LinkEvents | None = None,
        on_message_hook: Callable[[RawMessage], None] | None = None,
        overload: str = "backpressure",
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.events = events or LinkEvents()
        self.on_message_hook = on_message_hook  # test seam: runs inside the guarded callback
        self.filters = [template_filter(t) for t in (*config.input_topics, *config.frame_topics)]
        self.is_connected = threading.Event()
        self.is_subscribed = threading.Event()
        self.accepting = True
        self.connects = 0
        self.session_present = False  # the broker resumed the session on this connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        v5 = config.protocol == "5"
        self.overload = overload
        self.blocked = False  # the reader is waiting for room in the queue (back-pressure)
        # Forecasts handed to paho and not yet settled: (info, topic, payload, qos), oldest first.
        self._outgoing: deque[tuple[paho.MQTTMessageInfo, str, str | bytes, int]] = deque()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else config.clean_start,
            reconnect_on_failure=True,
            manual_ack=True,
        )
        self.client.suppress_exceptions = True  # backstop behind the guards below
        transport.secure(self.client, config)
        self.client.will_set(config.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        self.client.reconnect_delay_set(
            int(max(1, config.reconnect_min_delay)), int(max(1, config.reconnect_max_delay))
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = self._on_socket_open
        self.client.on_connect_fail = self._on_connect_fail

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; works while the broker is still down (retries, logged)."""
        properties = None
        clean_start: bool | int = paho.MQTT_CLEAN_START_FIRST_ONLY
        if self.config.protocol == "5":
            clean_start = self.config.clean_start
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry
            if self.overload == "backpressure" and self.inbox.maxsize > 0:
                # MQTT 5 flow control: the broker has at most this many unacknowledged QoS>0
                # messages out to us, so they cannot fill the queue and the reader need not
                # block; the rest waits in the broker's session queue. Half the queue, because
                # Mosquitto 2.0 was seen sending one past the limit after a run of acks.
                properties.ReceiveMaximum = max(1, min(65535, self.inbox.maxsize // 2))
        self.client.connect_async(
            self.config.host,
            self.config.port,
            self.config.keepalive,
            clean_start=clean_start,
            properties=properties,
        )
        self._start_loop()

    def _start_loop(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mqtt-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.loop_forever(retry_first_connection=True)
                return
            except Exception:
                self.events.callback_error("loop")
                log.exception("paho network loop failed; restarting it")
                time.sleep(min(self.config.reconnect_min_delay, 1.0))

    def watchdog(self) -> None:
        """Called from the engine thread: restart the network loop if its thread died."""
        if self._stop.is_set() or self._thread is None or self._thread.is_alive():
            return
        log.error("paho network thread is dead; restarting it")
        self.events.loop_restarted()
        self._start_loop()

    def stop_intake(self) -> None:
        """Stop taking new samples (the broker keeps QoS>0 ones for the session).

        A persistent session keeps its subscription, so the broker queues what arrives while the
        daemon is away; messages that still come in now are left unacknowledged and redelivered.
        """
        self.accepting = False
        if self.is_connected.is_set() and self.config.clean_start:
            self.client.unsubscribe(self.filters)

    def ack(self, messages: list[RawMessage]) -> None:
        """Acknowledge handled messages, in arrival order, if their connection is still the one.

        After a reconnect the broker redelivers what was unacknowledged, possibly under packet ids
        now given to other messages, so acking an old id could confirm a message never seen.
        """
        current = self.connects
        for raw in messages:
            if raw.qos > 0 and raw.connection == current:
                self.client.ack(raw.mid, raw.qos)

    def redelivered(self, raw: RawMessage) -> bool:
        """True for a QoS > 0 message from an earlier connection, the session since resumed.

        It was not acknowledged on its connection, so the resumed session sends it again; taking
        the copy that is queued now would only make the resent one a duplicate, and keep in the
        queue the room the broker's resends need (a full queue blocks paho's reader, and with it
        the broker's acks of our forecasts).
        """
        return raw.qos > 0 and raw.connection != self.connects and self.session_present

    def flush(self, timeout: float) -> bool:
        """Wait until every forecast handed to paho has left (QoS 0) or been acked (QoS > 0).

        False also when paho lost one unwritten: ``settle()`` hands it back to publish again.
        """
        deadline = time.monotonic() + timeout
        while self._outgoing:
            if self._prune():
                return False
            if time.monotonic() > deadline or not self.is_connected.is_set() or self.blocked:
                return False  # a reader blocked on a full queue writes nothing: do not wait
            time.sleep(0.002)
        return True

    @property
    def outgoing(self) -> int:
        """Forecasts handed to paho and not yet settled (an upper bound: oldest first)."""
        return len(self._outgoing)

    def _prune(self) -> bool:
        """Forget settled forecasts, oldest first; True when the oldest left is one paho lost."""
        while self._outgoing and _is_settled(self._outgoing[0][0]):
            if self._outgoing[0][0].rc == paho.MQTT_ERR_CONN_LOST:  # QoS 0, link broke unwritten
                return True
            self._outgoing.popleft()
        return False

    def settle(self) -> list[tuple[str, str | bytes, int]]:
        """Forget settled forecasts; return (topic, payload, qos) of those paho lost unwritten."""
        lost: list[tuple[str, str | bytes, int]] = []
        while self._prune():
            _, topic, payload, qos = self._outgoing.popleft()
            lost.append((topic, payload, qos))
        return lost

    def close(self, status: str = STATUS_STOPPED, timeout: float = 2.0) -> None:
        """Publish the final status, wait for outgoing messages, disconnect, join the loop."""
        if self.is_connected.is_set():
            info = self.client.publish(self.config.status_topic, status, qos=1, retain=True)
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- outgoing ----------------------------------------------------------------------------
    def corked(self) -> contextlib.AbstractContextManager[None]:
        """A tick's forecasts as few TCP segments (``transport.corked``)."""
        return transport.corked(self.client)

    def publish(self, topic: str, payload: str | bytes, qos: int) -> bool:
        """Hand a forecast to paho; False: it could not take it, the caller keeps it to retry.

        A QoS > 0 message refused as "not connected" is taken: paho keeps it and sends it after
        the reconnect (retrying it too would publish it twice).
        """
        self._prune()  # keeps the tracking small for callers that never call settle()
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc == paho.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == paho.MQTT_ERR_NO_CONN):
            self._outgoing.append((info, topic, payload, qos))
            return True
        return False

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """A retained QoS 1 message that is not a forecast (Home Assistant discovery); False:
        paho could not take it, the caller retries. paho keeps a QoS 1 message taken while
        disconnected and sends it after the reconnect."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    # -- callbacks (convert and enqueue, nothing more) ----------------------------------------
    @_guarded("on_socket_open")
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        transport.no_delay(sock)

    @_guarded("on_connect_fail")
    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` (TCP refused, TLS handshake failed).
        error = sys.exc_info()[1]
        log.warning(
            "cannot connect to %s:%s (%s); retrying with backoff",
            self.config.host,
            self.config.port,
            error or "connection failed",
        )

    @_guarded("on_connect")
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            hint = ""
            if str(reason) in ("Bad user name or password", "Not authorized"):
                hint = f" as user {self.config.username!r}: check mqtt.username and its password"
            log.warning(
                "broker %s:%s refused the connection (%s)%s; retrying with backoff",
                self.config.host,
                self.config.port,
                reason,
                hint,
            )
            return
        self.session_present = bool(flags.session_present)
        self.connects += 1
        if self.connects > 1:
            self.events.reconnected()
        log.info(
            "connected to %s:%s (connection %d)", self.config.host, self.config.port, self.connects
        )
        self.is_connected.set()
        self.events.connected(True)
        if self.accepting:
            client.subscribe([(f, self.config.qos_in) for f in self.filters])
        client.publish(self.config.status_topic, STATUS_ONLINE, qos=1, retain=True)

    @_guarded("on_subscribe")
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused for %s: %s", self.filters, failed)
            return
        log.info("subscribed to %s (qos %d)", self.filters, self.config.qos_in)
        self.is_subscribed.set()

    @_guarded("on_disconnect")
    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected = self.is_connected.is_set()
        self.is_connected.clear()
        self.is_subscribed.clear()
        self.events.connected(False)
        if was_connected and not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting with backoff", reason)

    @_guarded("on_message")
    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if not self.accepting:
            return  # left unacknowledged: the broker redelivers it to the next session
        raw = RawMessage(
            message.topic,
            message.payload,
            time.time(),
            message.qos,
            message.mid,
            self.connects,
        )
        if self.on_message_hook is not None:
            self.on_message_hook(raw)
        try:
            self.inbox.put_nowait(raw)
        except queue.Full:
            self._overloaded(raw)

    def _overloaded(self, raw: RawMessage) -> None:
        """The receive queue is full: wait for room, or drop (ack and count) one message."""
        if self.overload == "backpressure":
            self.events.backpressure()
            # QoS 0, or MQTT 3.1.1 (no Receive Maximum): blocking here stops paho reading the
            # socket, so TCP pushes back on the broker; QoS 1 messages stay unacknowledged.
            self.blocked = True
            try:
                while not self._stop.is_set() and self.accepting:
                    try:
                        self.inbox.put(raw, timeout=0.2)
                        return
                    except queue.Full:
                        continue
            finally:
                self.blocked = False
            return  # stopping: left unacknowledged for the next session
        if self.overload == "drop_oldest":
            try:
                oldest = self.inbox.get_nowait()
            except queue.Empty:
                oldest = None
            if oldest is not None:
                self.ack([oldest])
                self.events.dropped("queue_full_oldest")
            try:
                self.inbox.put_nowait(raw)
                return
            except queue.Full:
                pass
        self.ack([raw])
        self.events.dropped("queue_full")
