"""Many node agents in one process: `python -m services.node_agent --node-ids a,b,c`.

A thousand nodes as a thousand processes is too much for a small machine, so one pool process
hosts many agents. Each hosted agent is an unchanged `NodeAgentService`, with exactly the
semantics of a single-node agent process:

* its own heartbeat task (the pool staggers their start over one heartbeat interval, so that the
  agents of a pool do not all publish in the same instant);
* its own core and job runner, its own `CommitGate` and its own consumer group
  (`escalator-node-agent.<node>`), so that its committed offset is exactly what a single-node
  agent would commit: a request's offset is committed only after its job's final result is
  published. A node can move between a pool and a process of its own and resume from the same
  offset;
* it only ever sees requests keyed by its own node, and its core still ignores a request whose
  `node_id` is not its node.

What is shared: one producer (one `EventPublisher`), one world client, and **one group-less
consumer** manually assigned to the union of the hosted agents' partitions of NODE_COMMANDS.
`CommandDispatcher` reads it and hands each record to the agent whose node is the record's key
(records keyed by a node hosted elsewhere are skipped: their own agent reads them). Each agent
reads its records through an `AgentInbox`, which stands in for the consumer a single-node agent
has: `getmany` takes from the agent's queue, `commit` commits to the agent's own group through
`GroupOffsets` (OffsetCommit with no group membership, what a manually assigned consumer with a
group id does).

Where the shared consumer starts: on start-up the pool reads every hosted agent's committed
offset; each partition is read from the lowest of them (the beginning if an agent on it has never
committed), and a record is handed to an agent only at or after the agent's own committed offset.
So after a crash (kill -9) every agent re-reads exactly what a single-node agent would re-read:
its oldest unfinished request and what came after it.

Only records keyed by its node move an agent's committed offset; a request for another node on
the same partition does not (a single-node agent commits past such records too, but they would
only be ignored on re-read). The cost is that a pool restart re-reads foreign records from the
oldest commit on each partition, which are skipped by key without being decoded. A record without
a key cannot be routed; it is handed to the pool's first agent on that partition, which
dead-letters it if it does not decode, as a single-node agent would.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.commit import OffsetCommitRequest, OffsetFetchRequest
from aiokafka.structs import ConsumerRecord, TopicPartition

from escalator.bus import partition_for_key
from escalator.bus.connection import client_kwargs
from escalator.settings import KafkaSettings
from escalator.world.client import WorldClient
from schemas.topics import NODE_COMMANDS
from services.node_agent.ports import Executor
from services.node_agent.service import Clock, NodeAgentService, NodePublisher, bootstrap
from services.node_agent.settings import NodeAgentSettings

log = logging.getLogger(__name__)

# How many committed-offset look-ups run at once when a pool starts.
FETCH_CONCURRENCY = 32
# Retries of one commit or look-up on a retriable error (the coordinator moved, loading, ...).
OFFSET_ATTEMPTS = 5
OFFSET_BACKOFF_S = 0.1


def parse_node_ids(text: str) -> list[str]:
    """Node ids from a comma- and/or newline-separated list; blanks and `#` comments dropped.
    Raises ValueError on a repeated id."""
    ids: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        ids.extend(part.strip() for part in line.split(",") if part.strip())
    repeated = sorted({n for n in ids if ids.count(n) > 1})
    if repeated:
        raise ValueError(f"node ids repeat: {', '.join(repeated)}")
    return ids


# --- committed offsets of many groups over one client ------------------------------------------


class GroupOffsets:
    """Reads and commits offsets of any number of consumer groups over one client.

    A commit carries no group membership (generation -1, empty member id), as aiokafka's own
    commit does for a consumer with a group id and manually assigned partitions; the groups of
    node agents never have members. The coordinator of each group is looked up once and again
    after a coordinator error.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self._client = AIOKafkaClient(**client_kwargs(settings))
        self._coordinators: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        await self._client.bootstrap()

    async def close(self) -> None:
        await self._client.close()

    async def _coordinator(self, group: str) -> int:
        node_id = self._coordinators.get(group)
        if node_id is None:
            node_id = await self._client.coordinator_lookup(CoordinationType.GROUP, group)
            self._coordinators[group] = node_id
        return node_id

    async def _send(self, group: str, request: Any) -> Any:
        node_id = await self._coordinator(group)
        try:
            return await self._client.send(node_id, request, group=ConnectionGroup.COORDINATION)
        except KafkaError:
            self._coordinators.pop(group, None)
            raise

    async def _retrying(self, group: str, attempt: Any) -> Any:
        delay = OFFSET_BACKOFF_S
        for tries in range(1, OFFSET_ATTEMPTS + 1):
            try:
                return await attempt()
            except KafkaError as err:
                if not err.retriable or tries == OFFSET_ATTEMPTS:
                    raise
                if isinstance(err, _COORDINATOR_ERRORS):
                    self._coordinators.pop(group, None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def committed(
        self, group: str, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None: never committed)."""
        by_topic: dict[str, list[int]] = collections.defaultdict(list)
        for tp in partitions:
            by_topic[tp.topic].append(tp.partition)

        async def attempt() -> dict[TopicPartition, int | None]:
            response = await self._send(group, OffsetFetchRequest(group, list(by_topic.items())))
            top_error = getattr(response, "error_code", 0)
            if top_error:
                raise for_code(top_error)()
            found: dict[TopicPartition, int | None] = dict.fromkeys(partitions)
            for topic, parts in response.topics:
                for partition, offset, _metadata, error_code in parts:
                    if error_code:
                        raise for_code(error_code)()
                    found[TopicPartition(topic, partition)] = offset if offset >= 0 else None
            return found

        result: dict[TopicPartition, int | None] = await self._retrying(group, attempt)
        return result

    async def commit(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit `offsets` for `group`; raises a KafkaError if it did not take."""
        if not offsets:
            return
        by_topic: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
        for tp, offset in offsets.items():
            by_topic[tp.topic].append((tp.partition, offset, ""))
        request = OffsetCommitRequest(
            group,
            OffsetCommitRequest.DEFAULT_GENERATION_ID,
            "",
            OffsetCommitRequest.DEFAULT_RETENTION_TIME,
            list(by_topic.items()),
        )

        async def attempt() -> None:
            response = await self._send(group, request)
            for _topic, parts in response.topics:
                for _partition, error_code in parts:
                    if error_code:
                        raise for_code(error_code)()

        lock = self._locks.setdefault(group, asyncio.Lock())
        async with lock:  # one group's commits in order, so an older one never lands last
            await self._retrying(group, attempt)


def _coordinator_errors() -> tuple[type[KafkaError], ...]:
    from aiokafka import errors

    names = ("NotCoordinatorForGroupError", "GroupCoordinatorNotAvailableError")
    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


_COORDINATOR_ERRORS = _coordinator_errors()


# --- one agent's view of the shared consumer -----------------------------------------------


@dataclass
class AgentInbox:
    """What one hosted agent reads from and commits through (an `AgentConsumer`).

    Records are put by the dispatcher; `commit` goes to the agent's own group.
    """

    node_id: str
    group: str
    tp: TopicPartition
    offsets: GroupOffsets
    partitions: frozenset[int]
    # The agent's committed offset when the pool started: earlier records are not its to read.
    start: int | None = None
    _records: collections.deque[ConsumerRecord[bytes, bytes]] = field(
        default_factory=collections.deque
    )
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    assigned: bool = False
    # An idle agent's consume loop asks for records every 200 ms so that it sees a stop
    # request; hundreds of them would keep the process busy doing nothing. The inbox waits this
    # long instead, and `wake()` (on stop) ends the wait at once.
    idle_wait_s: float = 5.0

    def put(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self._records.append(record)
        self._arrived.set()

    def __len__(self) -> int:
        return len(self._records)

    # --- AgentConsumer -------------------------------------------------------------------------

    def partitions_for_topic(self, topic: str) -> Collection[int] | None:
        return set(self.partitions) if topic == self.tp.topic else None

    def assign(self, partitions: list[TopicPartition]) -> None:
        if list(partitions) != [self.tp]:
            raise ValueError(f"agent of {self.node_id} reads {self.tp}, not {partitions}")
        self.assigned = True

    def wake(self) -> None:
        """End a waiting `getmany` now (with no records, if none came)."""
        self._arrived.set()

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        if not self._records and timeout_ms > 0:
            try:
                async with asyncio.timeout(max(timeout_ms / 1000, self.idle_wait_s)):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        if not self._records:
            self._arrived.clear()
            return {}
        limit = len(self._records) if max_records is None else max_records
        batch = [self._records.popleft() for _ in range(min(limit, len(self._records)))]
        if not self._records:
            self._arrived.clear()
        return {self.tp: batch}

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if offsets:
            await self.offsets.commit(self.group, offsets)


# --- the shared consumer -------------------------------------------------------------------


class CommandDispatcher:
    """One group-less consumer over the hosted agents' partitions, routing records by key."""

    def __init__(
        self,
        consumer: Any,
        inboxes: Iterable[AgentInbox],
        *,
        poll_timeout_ms: int = 200,
    ) -> None:
        self._consumer = consumer
        self._by_key = {inbox.node_id.encode(): inbox for inbox in inboxes}
        self._poll_timeout_ms = poll_timeout_ms
        # Keyless records go to the first hosted agent of their partition.
        self._fallback: dict[TopicPartition, AgentInbox] = {}
        for inbox in sorted(self._by_key.values(), key=lambda i: i.node_id):
            self._fallback.setdefault(inbox.tp, inbox)
        self.dispatched = 0
        self.skipped = 0

    @property
    def partitions(self) -> list[TopicPartition]:
        return sorted(self._fallback, key=lambda tp: (tp.topic, tp.partition))

    def start_offsets(self) -> dict[TopicPartition, int | None]:
        """Per partition, where to start reading: the lowest committed offset of its agents
        (None, the beginning, if one of them never committed)."""
        starts: dict[TopicPartition, int | None] = {}
        for inbox in self._by_key.values():
            if inbox.tp not in starts:
                starts[inbox.tp] = inbox.start
                continue
            current = starts[inbox.tp]
            if current is None or inbox.start is None:
                starts[inbox.tp] = None
            else:
                starts[inbox.tp] = min(current, inbox.start)
        return starts

    async def position(self) -> None:
        """Assign the partitions and seek each to its start."""
        tps = self.partitions
        self._consumer.assign(tps)
        from_beginning = []
        for tp, start in self.start_offsets().items():
            if start is None:
                from_beginning.append(tp)
            else:
                self._consumer.seek(tp, start)
        if from_beginning:
            await self._consumer.seek_to_beginning(*from_beginning)

    def route(self, record: ConsumerRecord[bytes, bytes]) -> AgentInbox | None:
        """The agent a record is for, or None (another pool's node, or already committed)."""
        if record.key is None:
            inbox = self._fallback.get(TopicPartition(record.topic, record.partition))
        else:
            inbox = self._by_key.get(record.key)
        if inbox is None or (inbox.start is not None and record.offset < inbox.start):
            return None
        return inbox

    def dispatch(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        for records in batches.values():
            for record in records:
                inbox = self.route(record)
                if inbox is None:
                    self.skipped += 1
                    continue
                inbox.put(record)
                self.dispatched += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=1000
            )
            self.dispatch(batches)


# --- the pool ------------------------------------------------------------------------------


@dataclass
class PoolMember:
    settings: NodeAgentSettings
    inbox: AgentInbox
    service: NodeAgentService


class AgentPool:
    """Hosts one `NodeAgentService` per node over shared clients (see the module doc)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        members: Sequence[NodeAgentSettings],
        *,
        consumer: Any,
        offsets: GroupOffsets,
        publisher: NodePublisher,
        executor_for: Callable[[NodeAgentSettings], Executor],
        clock: Clock,
    ) -> None:
        if not members:
            raise ValueError("a pool needs at least one node")
        self.kafka = kafka
        self._settings = list(members)
        self._consumer = consumer
        self._offsets = offsets
        self._publisher = publisher
        self._executor_for = executor_for
        self._clock = clock
        self._stop = asyncio.Event()
        self.members: list[PoolMember] = []
        self.dispatcher: CommandDispatcher | None = None

    def request_stop(self) -> None:
        self._stop.set()
        for member in self.members:
            member.service.request_stop()
            member.inbox.wake()

    async def prepare(self) -> None:
        """Look up the partitions and every agent's committed offset; wire the agents."""
        from escalator.bus.partitioning import topic_partitions

        topic = self.kafka.topic(NODE_COMMANDS.name)
        partitions = frozenset(await topic_partitions(self._consumer, topic))
        inboxes = [
            AgentInbox(
                node_id=s.node_id,
                group=s.group_id,
                tp=TopicPartition(topic, partition_for_key(s.node_id.encode(), len(partitions))),
                offsets=self._offsets,
                partitions=partitions,
            )
            for s in self._settings
        ]
        semaphore = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def read_start(inbox: AgentInbox) -> None:
            async with semaphore:
                found = await self._offsets.committed(inbox.group, [inbox.tp])
            inbox.start = found.get(inbox.tp)

        await asyncio.gather(*(read_start(i) for i in inboxes))
        for settings, inbox in zip(self._settings, inboxes, strict=True):
            service = bootstrap(
                settings,
                executor=self._executor_for(settings),
                consumer=inbox,
                publisher=self._publisher,
                clock=self._clock,
            )
            self.members.append(PoolMember(settings, inbox, service))
        self.dispatcher = CommandDispatcher(self._consumer, inboxes)
        await self.dispatcher.position()

    async def run(self) -> None:
        """Serve until `request_stop()`. The dispatcher failing stops the pool with its error."""
        if self.dispatcher is None:
            await self.prepare()
        assert self.dispatcher is not None
        log.info(
            "node agent pool of %d node(s) on %d partition(s) starting",
            len(self.members),
            len(self.dispatcher.partitions),
        )
        dispatcher = asyncio.create_task(self.dispatcher.run(self._stop), name="dispatcher")
        interval = min(s.heartbeat_interval_s for s in self._settings)
        count = len(self.members)

        async def serve(index: int, member: PoolMember) -> None:
            # Stagger the agents over one heartbeat interval: their heartbeats then spread out.
            try:
                async with asyncio.timeout(interval * index / count):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            await member.service.run()

        agents = [
            asyncio.create_task(serve(i, m), name=f"agent {m.settings.node_id}")
            for i, m in enumerate(self.members)
        ]
        failure: BaseException | None = None
        try:
            pending: set[asyncio.Task[None]] = {dispatcher, *agents}
            while pending and failure is None and not self._stop.is_set():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        failure = task.exception()
                        log.error("%s failed: %r", task.get_name(), failure)
                if dispatcher in done:
                    break
        finally:
            # Every agent gets its graceful stop (a running upgrade its shutdown timeout).
            self.request_stop()
            await asyncio.gather(*agents, return_exceptions=True)
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            log.info("node agent pool of %d node(s) stopped", len(self.members))
        if failure is not None:
            raise failure


async def serve_pool(
    members: Sequence[NodeAgentSettings],
    build_executor: Callable[[WorldClient, NodeAgentSettings], Executor],
    *,
    consumer_wrapper: Callable[[Any], Any] | None = None,
) -> None:
    """The pool process: shared producer, consumer, offsets client and world client;
    `build_executor(world, settings)` makes each agent's executor, as for a single agent.
    `consumer_wrapper` wraps the shared command consumer (tests: delivery faults)."""
    from escalator.bus import make_consumer, make_producer
    from schemas.envelope import utcnow

    kafka = KafkaSettings()
    world = WorldClient(members[0].world_url)
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, None)
    if consumer_wrapper is not None:
        consumer = consumer_wrapper(consumer)
    offsets = GroupOffsets(kafka)

    def executor_for(settings: NodeAgentSettings) -> Executor:
        return build_executor(world, settings)

    await producer.start()
    try:
        await consumer.start()
        await offsets.start()
        try:
            pool = AgentPool(
                kafka,
                members,
                consumer=consumer,
                offsets=offsets,
                publisher=NodePublisher(producer, kafka),
                executor_for=executor_for,
                clock=utcnow,
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, pool.request_stop)
            await pool.prepare()
            await pool.run()
        finally:
            await offsets.close()
            await consumer.stop()
    finally:
        await producer.stop()
        await world.close()


__all__ = [
    "AgentInbox",
    "AgentPool",
    "CommandDispatcher",
    "GroupOffsets",
    "parse_node_ids",
    "serve_pool",
]
