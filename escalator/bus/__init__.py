"""The bus runtime shared by Escalator's services: clients, publishing, the consume loop.

* `connection`: the one factory for aiokafka producers, consumers and admin clients, and
  `ensure_topics` for the catalogue.
* `publisher`: `EventPublisher`, which publishes events durably (waits for the broker's ack).
* `consumer`: `EventConsumer`, the at-least-once consume loop with dead-lettering and dedupe,
  and `BackgroundWork` for long work outside the poll loop.
* `partitioning`: the Java-compatible default partitioner and manual own-partition assignment.
* `offsets`: `CommitGate`, which holds commits back while background work is running.
* `readback`: rebuilding state from compacted topics up to their high watermark.
"""

from escalator.bus.connection import (
    ClientKwargs,
    client_kwargs,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    topic_configs,
)
from escalator.bus.consumer import (
    HANDLER_ERROR,
    BackgroundWork,
    BusMetrics,
    ConsumerPort,
    EventConsumer,
    Handler,
    RecordInfo,
    RecordPort,
    dead_letter_for,
    is_transient_error,
)
from escalator.bus.offsets import CommitGate, PollingConsumer
from escalator.bus.partitioning import assign_own_partition, partition_for_key, topic_partitions
from escalator.bus.publisher import (
    DeadLetterSink,
    EventPublisher,
    ProducerPort,
    deliver_dead_letter,
    event_headers,
)
from escalator.bus.readback import read_to_high_watermark, scan

__all__ = [
    "HANDLER_ERROR",
    "BackgroundWork",
    "BusMetrics",
    "ClientKwargs",
    "CommitGate",
    "ConsumerPort",
    "DeadLetterSink",
    "EventConsumer",
    "EventPublisher",
    "Handler",
    "PollingConsumer",
    "ProducerPort",
    "RecordInfo",
    "RecordPort",
    "assign_own_partition",
    "client_kwargs",
    "dead_letter_for",
    "deliver_dead_letter",
    "ensure_topics",
    "event_headers",
    "is_transient_error",
    "make_admin",
    "make_consumer",
    "make_producer",
    "partition_for_key",
    "read_to_high_watermark",
    "scan",
    "topic_configs",
    "topic_partitions",
]
