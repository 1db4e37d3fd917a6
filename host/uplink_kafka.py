"""Host code. The Kafka uplink, through confluent-kafka (librdkafka): optional extra `kafka`.

One Kafka record per uplink record: key = the machine key ("site/line/machine"), value =
the uplink record's CBOR (docs/uplink.md), header `trace_id` = the W3C trace id in hex.
The key picks the partition (murmur2, as Java producers do), so every record of a machine
lands in one partition, in order.

The producer is idempotent with acks=all: librdkafka retries without duplicating or
reordering within a partition. `message.timeout.ms` defaults to 0 (never give up): while the
cluster is away, records wait in librdkafka (at most the runner's in-flight window) and in
the outbox. A record is confirmed by its delivery report; reports arrive per partition in
order but interleaved across partitions, and the `DeliveryTracker` turns them into the
contiguous prefix the outbox may drop. A failed delivery (a configured timeout, a fatal
idempotence error) makes the runner resend from the first unconfirmed record, after
recreating the producer if the error was fatal: at-least-once, deduped by consumers on
(node, boot, seq).

Tests use librdkafka's mock cluster: `config={"test.mock.num.brokers": 3}`;
`bootstrap_servers_in_use()` then names the mock brokers for a consumer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from edgeline.host.outbox import OutboxRecord
from edgeline.host.uplink import Progress, Uplink, UplinkBusy, UplinkError

log = logging.getLogger("edgeline.uplink.kafka")

DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",  # the Java client's choice: same key, same partition
    "message.timeout.ms": 0,  # never give up; the outbox bounds what waits
    "linger.ms": 5,
}
# What no configuration may change: without them records could be lost or reordered.
REQUIRED: dict[str, tuple[Any, ...]] = {
    "enable.idempotence": (True, "true"),
    "acks": ("all", "-1", -1),
}


def _confluent() -> ModuleType:
    try:
        import confluent_kafka
    except ImportError as e:
        raise UplinkError(
            "the Kafka uplink needs confluent-kafka, which is not installed: "
            "pip install 'edgeline[kafka]' (the optional extra `kafka`)"
        ) from e
    return confluent_kafka


class KafkaUplink(Uplink):
    """Idempotent Kafka producer feeding topic `topic`, keyed by machine.

    :param bootstrap_servers: "host:port,..." (ignored by librdkafka's mock cluster).
    :param topic: the Kafka topic.
    :param config: further librdkafka properties (security, compression, test.mock.*).
    :raises UplinkError: if confluent-kafka is not installed (names the extra).
    :raises ValueError: if `config` weakens idempotence or acks.
    """

    name = "kafka"

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = "edgeline-uplink",
        *,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._ck = _confluent()
        if not topic or len(topic) > 249 or not all(c.isalnum() or c in "._-" for c in topic):
            raise ValueError(f"Kafka topic {topic!r} must be 1-249 characters of [A-Za-z0-9._-]")
        self.topic = topic
        conf: dict[str, Any] = dict(DEFAULTS)
        if bootstrap_servers:
            conf["bootstrap.servers"] = bootstrap_servers
        conf.update(config or {})
        for key, allowed in REQUIRED.items():
            if conf[key] not in allowed:
                raise ValueError(
                    f"Kafka uplink config sets {key}={conf[key]!r}: it must stay {allowed[0]!r} "
                    "(no loss, no reordering); remove it from the uplink's kafka_config"
                )
        for key in ("error_cb", "on_delivery", "delivery.report.only.error"):
            if key in conf:
                raise ValueError(f"Kafka uplink config must not set {key!r}: the uplink owns it")
        self._conf = conf
        self._producer: Any = None
        self._fatal: str | None = None
        self.errors = 0

    def start(self) -> None:
        self._fatal = None
        self._producer = self._ck.Producer({**self._conf, "error_cb": self._on_error})

    @property
    def ready(self) -> bool:
        return self._producer is not None and self._fatal is None

    def send(self, record: OutboxRecord) -> None:
        if self._producer is None:
            raise UplinkBusy("the Kafka producer is not started")
        self.tracker.sent(record.id, record.id)
        try:
            self._producer.produce(
                self.topic,
                value=record.payload,
                key=record.key.encode(),
                headers=[("trace_id", record.trace_id.encode())],
                on_delivery=functools.partial(self._on_delivery, record.id),
            )
        except BufferError as e:  # librdkafka's queue is full
            self.tracker.unsend_last()
            raise UplinkBusy(f"Kafka producer queue is full: {e}") from e
        except self._ck.KafkaException as e:
            self.tracker.unsend_last()
            err = e.args[0] if e.args else None
            if err is not None and err.fatal():
                self._fatal = str(err)
            raise UplinkBusy(f"Kafka producer refused a record for {record.key!r}: {e}") from e

    def poll(self) -> Progress:
        if self._producer is not None:
            self._producer.poll(0)  # serves delivery reports on this thread
        p = self.tracker.progress()
        if self._fatal is not None:
            return Progress(p.confirmed_upto, True, p.unsettled)
        return p

    def reset(self) -> None:
        if self._fatal is not None and self._producer is not None:
            log.warning("recreating the Kafka producer after a fatal error: %s", self._fatal)
            self._close_producer(0.0)  # its purge reports come in before the tracker is cleared
            self.start()
        super().reset()

    def close(self, timeout: float = 5.0) -> None:
        if self._producer is not None:
            self._close_producer(timeout)

    def bootstrap_servers_in_use(self, timeout: float = 5.0) -> str:
        """The brokers the producer sees (with a mock cluster: the mock brokers' addresses)."""
        if self._producer is None:
            raise UplinkError("the Kafka producer is not started")
        md = self._producer.list_topics(timeout=timeout)
        return ",".join(f"{b.host}:{b.port}" for b in sorted(md.brokers.values(), key=lambda b: b.id))

    def _close_producer(self, timeout: float) -> None:
        left = self._producer.flush(timeout)
        if left:
            log.warning("Kafka uplink closed with %d record(s) unconfirmed: the outbox keeps them", left)
            self._producer.purge()
            self._producer.flush(0)
        self._producer = None

    # librdkafka callbacks: on the thread that calls poll()/flush()
    def _on_delivery(self, record_id: int, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1
            log.warning("Kafka delivery of outbox record %d failed: %s", record_id, err)
            if err.fatal():
                self._fatal = str(err)
        self.tracker.done(record_id, err is None)

    def _on_error(self, err: Any) -> None:
        self.errors += 1
        if err.fatal():
            self._fatal = str(err)
            log.error("Kafka uplink fatal error: %s", err)
        else:
            log.warning("Kafka uplink: %s", err)
