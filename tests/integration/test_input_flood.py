"""Hardened inputs: a hypothesis-generated flood on every consumed topic of a running deployment.

Issue 6: "hypothesis-generated events and raw bytes (at least 1,000 cases a topic) go to every
consumer: no crash, no stuck partition, and each rejected message sits on the dead-letter topic
with its reason."

The world and every service run as processes (the e2e harness, `fresh_deployment`): Upgrade
Manager, Cloud Manager, VNFM adapter, a node agent per node and the reference VNFMs (which play
the VNFM role of `vnfm.notices`). Once they are steady (every agent heard of, the Upgrade
Manager owning its partitions, the VNFM adapter's registry loaded), 1,000 cases per topic
(`COUNTS`; `fuzz_support` says what they are and how hypothesis makes them reproducibly) are
produced to every catalogue topic a process of the deployment consumes, the compacted views
included, interleaved across topics, with keys that spread over the partitions and, where the
broker takes them (not on compacted topics), null keys. A small campaign is started right
behind the flood, so that its records queue in the flooded partitions. Then:

1. every service process is still alive;
2. no partition is stuck: the campaign completes, and each consumer group's committed offset
   (admin `list_consumer_group_offsets`) on every flooded partition it reads reaches past the
   last flood record there;
3. every record the codec rejects (`fuzz_support.expected_reason`) is on the dead-letter topic
   once per reader of its partition, with that reason and a non-empty detail; valid foreign
   events are not dead-lettered, except where a service documents a rejection (`verdict`): the
   Upgrade Manager's ``wrong_partition`` for a campaign event keyed to another partition, the
   Cloud Manager's ``handler_error`` for a `VmListRequested` naming a node the cloud does not
   know, the VNFM adapter's ``vnfm_adapter_rejected`` for a request without campaign or a
   `NodeAvailable` addressed to a VNFM.

**At least once, not exactly once.** Delivery is at least once: a rebalance, or a redelivery
after a failed commit (2 CPUs here, and e2e groups have a 3 s session), makes a consumer handle
and so dead-letter a record again. The test requires *at least one* dead letter per (record,
reader), counts the extra copies in the report, and fails on a loss, never on a duplicate. A
reader is a consumer group or a group-less follower of a compacted topic: the Upgrade Manager's
views of heartbeats, inventory and registry dead-letter under its group name, the VNFM
adapter's registry reader as ``<instance> (registry reader)``. A node agent reads only the
partition of `node.commands` its node's key goes to, so records on the other partitions are
read by nobody (reported as "unread"); half of that topic's cases are keyed by the deployment's
node ids so that every agent gets its share.

The table (cases by kind, dead letters by reason, readers, losses, duplicates, timings) is
printed (`pytest -s`) and written to ``.cache/fuzz/flood-report.json`` with the cases by shape
and a sample dead letter per topic and reason. The corpus is cached in ``.cache/fuzz/`` under a
digest of what it depends on; a cold run generates it in two worker processes while the
deployment starts.

**Known bugs.** The flood found defects outside this file; each is described in a constant
below (`CODEC_RAISES`, `CM_NULL_CAMPAIGN`, `TOMBSTONE_KEY`, `DEAD_LETTER_TOO_LARGE`,
`RECOVERY_OVERFLOW`), pinned by a small test of its own below the flood (all but
`CM_NULL_CAMPAIGN`, which needs the Cloud Manager process: the flood's commit check pins it),
and marks the checks it breaks as strict xfails: once a bug is fixed its tests XPASS, which
fails the run until its marker is removed. (The campaign check is a non-strict xfail: whether
the frozen heartbeat view stalls it depends on timing.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fuzz_support as fz
import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from e2e_harness import E2EDeployment, fresh_deployment

from escalator.broker import BrokerHandle
from escalator.bus import (
    EventConsumer,
    EventPublisher,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    partition_for_key,
)
from escalator.bus.readback import scan
from escalator.registry import VnfRegistry
from escalator.status import CampaignView
from schemas import topics as t
from schemas.codec import InvalidReason, decode, encode
from schemas.deadletter import DeadLetter
from schemas.envelope import Event
from schemas.events import (
    BusinessMoveRequested,
    NodeAgentHeartbeat,
    NodeAvailable,
    NodeInventoryReported,
    VmListRequested,
    VnfProfile,
    VnfRegistered,
)
from schemas.topics import DEAD_LETTERS_TOPIC, Service, TopicSpec
from schemas.types import RedundancyModel
from services.cloud_manager.settings import CloudManagerSettings
from services.node_agent.settings import NodeAgentSettings
from services.upgrade_manager.cloud_view import CloudView
from services.upgrade_manager.heartbeats import HeartbeatView
from services.upgrade_manager.routing import INPUT_TOPICS, OWN_OUTPUTS
from services.upgrade_manager.settings import UpgradeManagerSettings
from services.vnfm_adapter.domain import AdapterState
from services.vnfm_adapter.domain import Context as AdapterContext
from services.vnfm_adapter.domain import decide as adapter_decide
from services.vnfm_adapter.service import KafkaRegistrySource
from services.vnfm_adapter.settings import ReferenceVnfmSettings, VnfmAdapterSettings

# Markers per test: the module also holds unit tests and small integration tests of the bugs.
FLOOD = [
    pytest.mark.integration,
    pytest.mark.real_kafka,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

COUNTS = {fz.RAW: 400, fz.MALFORMED: 350, fz.VALID: 250}  # 1,000 cases a topic
NODES = 4
CAMPAIGN_NODES = 2
QUIET_S = 20.0  # the flood is drained, or stuck, when nothing moved for this long
DRAIN_MAX_S = 300.0  # and given up on after this long in any case
CAMPAIGN_TIMEOUT_S = 120.0
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "fuzz"
REPORT = CACHE / "flood-report.json"

# Who in the deployment reads what: the VNFM role is played by the reference VNFMs.
DEPLOYED = {
    Service.UPGRADE_MANAGER,
    Service.CLOUD_MANAGER,
    Service.VNFM_ADAPTER,
    Service.NODE_AGENT,
    Service.VNFM,
}
FLOODED: tuple[TopicSpec, ...] = tuple(s for s in t.ALL_TOPICS if DEPLOYED & set(s.consumers))


def apply(marks: list[pytest.MarkDecorator]) -> Any:
    def decorate(fn: Any) -> Any:
        for mark in marks:
            fn = mark(fn)
        return fn

    return decorate


def _default(settings_class: Any, name: str) -> str:
    value: str = settings_class.model_fields[name].default
    return value


# --- known bugs ------------------------------------------------------------------------------

# Found by this test; each marks the checks it breaks as strict xfails (an XPASS fails: remove
# the marker once the bug is fixed). See the module doc.
CODEC_RAISES = (
    "FIXED; was: "
    "schemas/codec.py decode(): json.loads raises a plain ValueError (not JSONDecodeError) "
    "on an integer literal longer than 4,300 digits (CPython's int_max_str_digits); decode "
    "catches only (JSONDecodeError, RecursionError), so it raises. EventConsumer dead-letters "
    "the record as consumer_error, the Upgrade Manager as handler_error, and the compacted-topic "
    "followers (escalator/bus/follower.py _follow, services/vnfm_adapter/service.py "
    "KafkaRegistrySource.run) do not catch it: the follow task dies silently and the view "
    "(heartbeats, inventory, registry) is frozen from then on."
)
CM_NULL_CAMPAIGN = (
    "FIXED; was: "
    "services/cloud_manager/service.py _answer(): a valid command with campaign_id null gets "
    "a reply that CLOUD_EVENTS cannot key (TopicSpec.key_for raises ValueError in _publish); "
    "the exception escapes _answer before gate.release(), so the command is neither answered "
    "nor dead-lettered and the CommitGate holds the partition's committed offset at it forever."
)
DEAD_LETTER_TOO_LARGE = (
    "FIXED; was: "
    "escalator/bus/consumer.py dead_letter_for(): the value is capped at 512 KiB but the "
    "key and headers are copied whole (base64: +33%); a record with a large key makes a dead "
    "letter above the producer's max_request_size, MessageSizeTooLargeError is retried for "
    "ever (_dead_letter / deliver_dead_letter) and the partition is stuck behind it."
)
TOMBSTONE_KEY = (
    "FIXED; was: "
    "a tombstone whose key is not UTF-8 on a compacted topic kills the view that follows "
    "it: services/upgrade_manager/cloud_view.py apply_registry/apply_inventory and "
    "escalator/registry.py VnfRegistry.apply call key.decode() on a deletion, the "
    "UnicodeDecodeError escapes CompactedFollower._on_record (escalator/bus/follower.py) and "
    "KafkaRegistrySource.run (services/vnfm_adapter/service.py), and the follow task ends "
    "silently: the inventory and registry views stop changing."
)
RECOVERY_OVERFLOW = (
    "FIXED; was: "
    "services/vnfm_adapter/domain.py _start_recovery(): ctx.now + "
    "timedelta(seconds=profile.min_recovery_s) raises OverflowError for a registered VNF whose "
    "min_recovery_s is above ~2.5e11 s, which VnfProfile accepts (ge=0, no upper bound): every "
    "NodeAvailable naming that VNF fails, is retried, dead-lettered as handler_error, and the "
    "VNFM is never told the node is back."
)


def known_bug(reason: str, *, strict: bool = True) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=strict, reason=reason)


# --- who must dead-letter, who must commit ---------------------------------------------------

UM, CM, ADAPTER, VNFMS, AGENTS = (
    "upgrade-manager",
    "cloud-manager",
    "vnfm-adapter",
    "reference-vnfms",
    "node-agents",
)
ROLES = (UM, CM, ADAPTER, VNFMS, AGENTS)
FOLLOWED = (t.NODE_HEARTBEATS, t.CLOUD_INVENTORY, t.VNF_REGISTRY)  # group-less views


@dataclass(frozen=True)
class Readers:
    """Per topic and partition: the dead-letter `consumer_group` labels that must appear for a
    rejected record, and the Kafka consumer groups whose committed offsets must pass the flood;
    and the role of each group."""

    dead_letterers: dict[tuple[str, int], frozenset[str]]
    committers: dict[tuple[str, int], frozenset[str]]
    roles: dict[str, str]


def readers_of(d: E2EDeployment) -> Readers:
    s = d.settings
    um = s.topic(_default(UpgradeManagerSettings, "group_id"))
    cm = _default(CloudManagerSettings, "group_id")
    adapter = _default(VnfmAdapterSettings, "group_id")
    registry_reader = f"{_default(VnfmAdapterSettings, 'instance_id')} (registry reader)"
    vnfms = [ReferenceVnfmSettings(vnfm_id=v).group for v in d.vnfm_ids]
    roles = {um: UM, cm: CM, adapter: ADAPTER, registry_reader: ADAPTER}
    roles.update(dict.fromkeys(vnfms, VNFMS))
    agents: dict[int, set[str]] = defaultdict(set)
    for node in d.node_ids:
        group = NodeAgentSettings(node_id=node).group_id
        agents[partition_for_key(node.encode(), s.partitions)].add(group)
        roles[group] = AGENTS
    groups: dict[str, list[str]] = {spec.name: [] for spec in FLOODED}
    followers: dict[str, list[str]] = {spec.name: [] for spec in FLOODED}
    for spec in INPUT_TOPICS:
        groups[spec.name].append(um)
    groups[t.CLOUD_COMMANDS.name].append(cm)
    groups[t.VNFM_REQUESTS.name].append(adapter)
    groups[t.VNFM_REPLIES.name].append(adapter)
    groups[t.VNFM_NOTICES.name] += vnfms
    for spec in FOLLOWED:
        followers[spec.name].append(um)  # dead-lettered under the Manager's group name
    followers[t.VNF_REGISTRY.name].append(registry_reader)
    dead_letterers: dict[tuple[str, int], frozenset[str]] = {}
    committers: dict[tuple[str, int], frozenset[str]] = {}
    for spec in FLOODED:
        for p in range(s.partitions):
            committed = set(groups[spec.name])
            if spec is t.NODE_COMMANDS:
                committed = agents.get(p, set())
            committers[(spec.name, p)] = frozenset(committed)
            dead_letterers[(spec.name, p)] = frozenset(committed | set(followers[spec.name]))
    return Readers(dead_letterers, committers, roles)


# Machine-readable reasons a dead letter may carry: the codec's, and the services' own.
SERVICE_REASONS = {"handler_error", "consumer_error", "wrong_partition", "vnfm_adapter_rejected"}
KNOWN_REASONS = {r.value for r in InvalidReason} | SERVICE_REASONS


@dataclass(frozen=True)
class Verdict:
    """What the readers of one record must do with it."""

    reason: str | None  # every reader dead-letters it with this reason; None: nobody must
    may: frozenset[str] = frozenset()  # reasons a reader may give a valid event (state-dependent)
    codec_raises: bool = False  # `decode` raises on it (CODEC_RAISES): reason is what it deserves


def verdict(spec: TopicSpec, case: fz.Case, partition: int, partitions: int) -> Verdict:
    if case.value is None and spec.compacted:
        return Verdict(None)  # a tombstone: a deletion (of a key nobody had), not a bad record
    reason = fz.expected_reason(case.value)
    if reason is not None:
        return Verdict(reason, codec_raises=fz.decode_raises(case.value) is not None)
    event = decode(case.value)
    assert isinstance(event, Event)
    # Valid and foreign: ignored, except where a service documents a rejection.
    if (
        spec in INPUT_TOPICS
        and event.campaign_id is not None
        and not (spec is t.CAMPAIGNS and event.event_type in OWN_OUTPUTS)
        and partition_for_key(event.campaign_id.encode(), partitions) != partition
    ):
        # The Upgrade Manager: "producers must use Kafka's default (murmur2) partitioner".
        return Verdict("wrong_partition")
    if spec is t.CLOUD_COMMANDS and isinstance(event, VmListRequested):
        # The Cloud Manager: no reply event can say "no such node" (CommandFailed).
        return Verdict("handler_error")
    if spec is t.CLOUD_COMMANDS and event.campaign_id is None:
        # Its reply cannot be keyed (CM_NULL_CAMPAIGN): dead-lettering it would be a fix.
        return Verdict(None, may=frozenset({"handler_error"}))
    if spec is t.VNFM_REQUESTS and isinstance(event, BusinessMoveRequested):
        if event.campaign_id is None:  # the adapter: "missing_campaign", an internal error
            return Verdict("vnfm_adapter_rejected")
        # "stale_request" when an older attempt for the same (fuzz) node comes after a newer one
        return Verdict(None, may=frozenset({"vnfm_adapter_rejected"}))
    if spec is t.VNFM_REQUESTS and isinstance(event, NodeAvailable) and event.vnfm_id:
        return Verdict("vnfm_adapter_rejected")  # "not_internal": that one is for a VNFM
    return Verdict(None)


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Sent:
    case: fz.Case
    partition: int
    offset: int
    verdict: Verdict


@dataclass
class Outcome:
    deployment: E2EDeployment
    readers: Readers
    sent: list[Sent]
    refused: list[tuple[fz.Case, str]]
    dead: dict[tuple[str, int, int], list[DeadLetter]]
    stray: list[DeadLetter]
    flood_end: dict[tuple[str, int], int]
    committed: dict[str, dict[tuple[str, int], int]]
    view: CampaignView | None
    campaign_error: str
    dead_processes: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    corpus_cached: bool = False


async def build_corpus() -> tuple[dict[str, list[fz.Case]], bool]:
    """The corpus from the cache, or generated in worker processes (and cached)."""
    path = CACHE / f"corpus-{fz.corpus_digest(COUNTS)}.json.gz"
    cached = fz.load_corpus(path)
    if cached is not None and set(cached) >= {s.name for s in FLOODED}:
        return cached, True
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(pool, fz.topic_corpus_json, spec.name, COUNTS)
                for spec in FLOODED
            )
        )
    raw = {spec.name: part for spec, part in zip(FLOODED, parts, strict=True)}
    fz.save_corpus(path, raw)
    loaded = fz.load_corpus(path)
    assert loaded is not None
    return loaded, False


def rekey_node_commands(cases: list[fz.Case], node_ids: list[str]) -> list[fz.Case]:
    """Half of node.commands keyed by real node ids: every agent's partition gets its share."""
    return [
        replace(c, key=node_ids[(i // 2) % len(node_ids)].encode()) if i % 2 == 0 else c
        for i, c in enumerate(cases)
    ]


async def flood(
    d: E2EDeployment, corpus: dict[str, list[fz.Case]]
) -> tuple[list[Sent], list[tuple[fz.Case, str]]]:
    """Produce every case, interleaved across topics; returns where each landed."""
    per_topic = [list(corpus[spec.name]) for spec in FLOODED]
    order: list[fz.Case] = []
    for i in range(max(len(c) for c in per_topic)):
        order += [cases[i] for cases in per_topic if i < len(cases)]
    producer = make_producer(d.settings)
    await producer.start()
    try:
        futures = []
        for case in order:
            futures.append(
                await producer.send(
                    d.settings.topic(case.topic),
                    value=case.value,
                    key=case.key,
                    headers=list(case.headers) or None,
                )
            )
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await producer.stop()
    sent: list[Sent] = []
    refused: list[tuple[fz.Case, str]] = []
    for case, result in zip(order, results, strict=True):
        if isinstance(result, BaseException):
            refused.append((case, repr(result)))
        else:
            spec = _spec(case.topic)
            judged = verdict(spec, case, result.partition, d.settings.partitions)
            sent.append(Sent(case, result.partition, result.offset, judged))
    return sent, refused


class DeadLetterWatch:
    """Follows the dead-letter topic from the beginning, indexing letters by source record."""

    def __init__(self, d: E2EDeployment) -> None:
        self.d = d
        self.by_record: dict[tuple[str, int, int], list[DeadLetter]] = defaultdict(list)
        self.count = 0
        self.task: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        topic = self.d.settings.topic(DEAD_LETTERS_TOPIC)
        async for record in scan(self.d.settings, topic, follow=True):
            letter = DeadLetter.model_validate_json(record.value or b"")  # our own records
            self.by_record[(letter.source_topic, letter.partition, letter.offset)].append(letter)
            self.count += 1

    def start(self) -> None:
        self.task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def committed_offsets(
    d: E2EDeployment, groups: set[str]
) -> dict[str, dict[tuple[str, int], int]]:
    admin = make_admin(d.settings)
    await admin.start()
    try:
        found: dict[str, dict[tuple[str, int], int]] = {}
        for group in sorted(groups):
            offsets = await admin.list_consumer_group_offsets(group)
            found[group] = {
                (tp.topic, tp.partition): meta.offset
                for tp, meta in offsets.items()
                if isinstance(tp, TopicPartition) and meta.offset >= 0
            }
        return found
    finally:
        await admin.close()


def missing_letters(
    sent: list[Sent], readers: Readers, dead: dict[tuple[str, int, int], list[DeadLetter]], s: Any
) -> int:
    missing = 0
    for item in sent:
        spec = _spec(item.case.topic)
        if item.verdict.reason is None:
            continue
        got = {
            x.consumer_group
            for x in dead.get((s.topic(spec.name), item.partition, item.offset), [])
        }
        missing += len(readers.dead_letterers[(spec.name, item.partition)] - got)
    return missing


def lagging(o: Outcome, role: str | None = None) -> list[str]:
    """Groups (of `role`) whose committed offset is below the end of the flood somewhere."""
    s = o.deployment.settings
    behind = []
    for (topic, p), end in sorted(o.flood_end.items()):
        for group in sorted(o.readers.committers[(topic, p)]):
            if role is not None and o.readers.roles[group] != role:
                continue
            at = o.committed.get(group, {}).get((s.topic(topic), p), -1)
            if at < end:
                behind.append(f"{group} {topic}[{p}] committed {at} < {end}")
    return behind


def _spec(name: str) -> TopicSpec:
    return next(s for s in FLOODED if s.name == name)


async def run_campaign(d: E2EDeployment) -> tuple[CampaignView | None, str]:
    campaign_id = f"cmp-flood-{uuid.uuid4().hex[:8]}"
    try:
        await d.start_campaign(campaign_id, nodes=d.node_ids[:CAMPAIGN_NODES])
        view = await d.follow_campaign(campaign_id, timeout_s=CAMPAIGN_TIMEOUT_S, check_alive=False)
        return view, ""
    except AssertionError as err:
        return None, str(err).splitlines()[0]


async def scenario(d: E2EDeployment) -> Outcome:
    timings: dict[str, float] = {}
    started = time.monotonic()
    corpus_task = asyncio.create_task(build_corpus())
    await d.prepare()
    await d.wait_log("vnfm-adapter", r"vnfm adapter ready", timeout_s=60)
    timings["deployment ready"] = time.monotonic() - started
    mark = time.monotonic()
    corpus, cached = await corpus_task
    timings["corpus wait (after the deployment was ready)"] = time.monotonic() - mark
    corpus[t.NODE_COMMANDS.name] = rekey_node_commands(corpus[t.NODE_COMMANDS.name], d.node_ids)
    readers = readers_of(d)
    groups = {g for gs in readers.committers.values() for g in gs}
    watch = DeadLetterWatch(d)
    watch.start()
    try:
        mark = time.monotonic()
        sent, refused = await flood(d, corpus)
        flood_done = time.monotonic()
        timings["flood produced and judged"] = flood_done - mark
        flood_end: dict[tuple[str, int], int] = {}
        for item in sent:
            where = (item.case.topic, item.partition)
            flood_end[where] = max(flood_end.get(where, 0), item.offset + 1)
        outcome = Outcome(d, readers, sent, refused, {}, [], flood_end, {}, None, "", [])

        # A small campaign right behind the flood, in the flooded partitions.
        campaign = asyncio.create_task(run_campaign(d))

        # Until every reader dead-lettered what it must and every group committed past the
        # flood, or nothing moved for QUIET_S (a reader that stopped will not catch up).
        loop = asyncio.get_running_loop()
        progress, moved_at = None, loop.time()
        while True:
            outcome.committed = await committed_offsets(d, groups)
            missing = missing_letters(sent, readers, watch.by_record, d.settings)
            behind = lagging(outcome)
            if not missing and not behind:
                break
            now = (missing, watch.count, str(sorted(outcome.committed.items())))
            if now != progress:
                progress, moved_at = now, loop.time()
            elif loop.time() - moved_at > QUIET_S:
                break
            if time.monotonic() - flood_done > DRAIN_MAX_S:
                break
            await asyncio.sleep(1.0)
        timings["flood drained (from its end)"] = time.monotonic() - flood_done
        outcome.view, outcome.campaign_error = await campaign
        timings["campaign over (from the end of the flood)"] = time.monotonic() - flood_done
        await asyncio.sleep(2.0)  # late duplicates, if any, are counted too
        outcome.committed = await committed_offsets(d, groups)
    finally:
        await watch.stop()
    timings["total"] = time.monotonic() - started
    flood_records = {(d.settings.topic(i.case.topic), i.partition, i.offset) for i in sent}
    outcome.dead = dict(watch.by_record)
    outcome.stray = [x for k, xs in watch.by_record.items() if k not in flood_records for x in xs]
    outcome.dead_processes = [c.name for c in d.group.dead()]
    outcome.timings = timings
    outcome.corpus_cached = cached
    return outcome


# --- the report ------------------------------------------------------------------------------


@dataclass
class TopicResult:
    topic: str
    sent: Counter[str] = field(default_factory=Counter)
    to_reject: int = 0  # records whose readers must dead-letter them
    unread: int = 0  # of those, on a partition nobody reads (node.commands without an agent)
    readers: set[str] = field(default_factory=set)
    letters_by_reason: Counter[str] = field(default_factory=Counter)
    expected_letters: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    wrong_reason: list[str] = field(default_factory=list)
    codec_raised: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # unknown reason or empty detail
    valid_dead_lettered: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)


def analyse(o: Outcome) -> dict[str, TopicResult]:
    results = {spec.name: TopicResult(spec.name) for spec in FLOODED}
    s = o.deployment.settings
    for item in o.sent:
        spec = _spec(item.case.topic)
        r = results[spec.name]
        r.sent[item.case.kind] += 1
        readers = o.readers.dead_letterers[(spec.name, item.partition)]
        r.readers |= readers
        letters = o.dead.get((s.topic(spec.name), item.partition, item.offset), [])
        where = f"[{item.partition}]@{item.offset} {item.case.kind}/{item.case.shape}"
        for letter in letters:
            r.letters_by_reason[letter.reason] += 1
            r.samples.setdefault(
                letter.reason, letter.model_dump(mode="json", exclude={"value_b64"})
            )
            if letter.reason not in KNOWN_REASONS or not letter.detail.strip():
                r.unreadable.append(f"{where}: {letter.reason!r} {letter.detail!r:.80}")
        v = item.verdict
        if v.reason is None:
            for letter in letters:
                if letter.reason not in v.may:
                    r.valid_dead_lettered.append(
                        f"{where}: {letter.consumer_group}: {letter.reason}: {letter.detail[:160]}"
                    )
            continue
        r.to_reject += 1
        r.unread += not readers
        r.expected_letters += len(readers)
        by_group = Counter(x.consumer_group for x in letters)
        for group in sorted(readers):
            if by_group[group] == 0:
                r.lost.append(f"{where} by {group} (expected {v.reason})")
            r.duplicates += max(0, by_group[group] - 1)
        for letter in letters:
            said = f"{where}: {letter.consumer_group} said {letter.reason} ({letter.detail[:100]})"
            if letter.consumer_group not in readers:
                r.wrong_reason.append(f"{said}; not a reader of that partition")
            elif v.codec_raises:
                if letter.reason != v.reason:
                    r.codec_raised.append(f"{said}, expected {v.reason}")
            elif letter.reason != v.reason:
                r.wrong_reason.append(f"{said}, expected {v.reason}")
    return results


def render(o: Outcome, results: dict[str, TopicResult]) -> str:
    head = (
        f"{'topic':22} {'raw':>4} {'malf':>5} {'valid':>5} | {'reject':>6} {'unread':>6} "
        f"{'rdrs':>4} {'letters':>7} {'lost':>5} {'dup':>4} {'wrong':>5} {'codec':>5} "
        f"{'validDL':>7}"
    )
    lines = [
        "",
        f"INPUT FLOOD: {len(o.sent)} records to {len(FLOODED)} topics ({len(o.refused)} refused "
        f"by the producer or broker); corpus "
        f"{'from the cache' if o.corpus_cached else 'generated by hypothesis in this run'}",
        "raw/malf/valid: cases sent by kind; reject: records the codec (or a documented service "
        "rule) rejects; unread: on a partition nobody reads; rdrs: readers; letters: dead "
        "letters found; lost: (record, reader) without one; dup: extra copies; wrong: other "
        "reason or reader; codec: records decode() raises on, with another reason than not_json; "
        "validDL: valid events dead-lettered",
        head,
        "-" * len(head),
    ]
    for spec in FLOODED:
        r = results[spec.name]
        found = sum(r.letters_by_reason.values())
        lines.append(
            f"{spec.name.removeprefix('escalator.').removesuffix('.v1'):22} {r.sent[fz.RAW]:4} "
            f"{r.sent[fz.MALFORMED]:5} {r.sent[fz.VALID]:5} | {r.to_reject:6} {r.unread:6} "
            f"{len(r.readers):4} {found:7} {len(r.lost):5} {r.duplicates:4} "
            f"{len(r.wrong_reason):5} {len(r.codec_raised):5} {len(r.valid_dead_lettered):7}"
        )
    total = Counter[str]()
    for r in results.values():
        total.update(r.letters_by_reason)
    lines += ["", f"dead letters by source topic and reason ({sum(total.values())} in all):"]
    for spec in FLOODED:
        r = results[spec.name]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.letters_by_reason.items()))
        lines.append(f"  {spec.name.removeprefix('escalator.'):24} {reasons}")
    lines += ["", "readers per topic (the consumer_group of their dead letters):"]
    for spec in FLOODED:
        names = ", ".join(sorted(results[spec.name].readers)) or "-"
        lines.append(f"  {spec.name.removeprefix('escalator.'):24} {names}")
    behind = lagging(o)
    lines += [
        "",
        "committed offsets past the flood: "
        + (
            "every group, every flooded partition"
            if not behind
            else f"{len(behind)} group-partition(s) behind: {'; '.join(behind[:6])}"
        ),
        f"campaign after the flood: "
        f"{o.view.state if o.view is not None else 'not over: ' + o.campaign_error}",
        f"processes that died: {', '.join(o.dead_processes) or 'none'}; dead letters of other "
        f"records than the flood's: {len(o.stray)}",
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in o.timings.items()),
    ]
    return "\n".join(lines)


def write_report(o: Outcome, results: dict[str, TopicResult], text: str) -> None:
    shapes: dict[str, Counter[str]] = defaultdict(Counter)
    for item in o.sent:
        shapes[item.case.topic][f"{item.case.kind}/{item.case.shape}"] += 1
    report = {
        "cases_per_topic": COUNTS,
        "corpus_digest": fz.corpus_digest(COUNTS),
        "corpus_cached": o.corpus_cached,
        "timings_s": o.timings,
        "campaign": o.view.state if o.view is not None else o.campaign_error,
        "dead_processes": o.dead_processes,
        "refused": [(c.describe(), why) for c, why in o.refused],
        "stray_dead_letters": [x.model_dump(mode="json", exclude={"value_b64"}) for x in o.stray],
        "lagging": lagging(o),
        "topics": {
            name: {
                "sent_by_kind": dict(r.sent),
                "sent_by_shape": dict(sorted(shapes[name].items())),
                "to_reject": r.to_reject,
                "unread": r.unread,
                "readers": sorted(r.readers),
                "dead_letters_by_reason": dict(sorted(r.letters_by_reason.items())),
                "expected_dead_letters": r.expected_letters,
                "duplicates": r.duplicates,
                "lost": r.lost,
                "wrong_reason": r.wrong_reason,
                "codec_raised": r.codec_raised,
                "unreadable": r.unreadable,
                "valid_dead_lettered": r.valid_dead_lettered,
                "sample_dead_letter_per_reason": r.samples,
            }
            for name, r in results.items()
        },
        "table": text.splitlines(),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2, default=str))


@dataclass
class Flood:
    outcome: Outcome
    results: dict[str, TopicResult]


@pytest.fixture(scope="module")
def flooded(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flood]:
    if broker.kind == "tansu":
        pytest.skip("needs Apache Kafka semantics; the session broker is Tansu")
    d = fresh_deployment(broker, tmp_path_factory.mktemp("flood"), nodes=NODES, seed=23)
    try:
        outcome = asyncio.run(scenario(d))
        results = analyse(outcome)
        text = render(outcome, results)
        write_report(outcome, results, text)
        print(text)
        print(f"report: {REPORT}; logs: {d.group.log_dir}")
        yield Flood(outcome, results)
    finally:
        d.stop()


# --- the checks ------------------------------------------------------------------------------


@apply(FLOOD)
def test_at_least_1000_cases_a_topic(flooded: Flood) -> None:
    o = flooded.outcome
    assert not o.refused, f"refused by the producer/broker: {o.refused[:5]}"
    sent = Counter(i.case.topic for i in o.sent)
    assert all(sent[spec.name] >= 1000 for spec in FLOODED), sent
    for spec in FLOODED:
        kinds = flooded.results[spec.name].sent
        assert all(kinds[k] > 0 for k in fz.KINDS), (spec.name, kinds)


@apply(FLOOD)
def test_every_service_survived(flooded: Flood) -> None:
    o = flooded.outcome
    assert not o.dead_processes, f"died: {o.dead_processes}\n{o.deployment.logs()}"


@apply(FLOOD)
def test_a_campaign_completes_after_the_flood(flooded: Flood) -> None:
    o = flooded.outcome
    assert o.view is not None, f"{o.campaign_error}\n{o.deployment.logs(10)}"
    assert o.view.state == "completed", f"{o.view.state}: {o.view.reason}"


def _role_param(role: str) -> Any:
    return pytest.param(role, id=role)


@apply(FLOOD)
@pytest.mark.parametrize("role", [_role_param(r) for r in ROLES])
def test_every_group_commits_past_the_flood(flooded: Flood, role: str) -> None:
    o = flooded.outcome
    assert role in o.readers.roles.values()
    behind = lagging(o, role)
    assert not behind, f"{len(behind)} stuck or lagging:\n" + "\n".join(behind)


def _topic_param(spec: TopicSpec, bug: str | None = None) -> Any:
    marks = [known_bug(bug)] if bug else []
    return pytest.param(spec, marks=marks, id=spec.name.removeprefix("escalator."))


@apply(FLOOD)
@pytest.mark.parametrize("spec", [_topic_param(s) for s in FLOODED])
def test_every_rejected_record_is_dead_lettered_by_every_reader(
    flooded: Flood, spec: TopicSpec
) -> None:
    r = flooded.results[spec.name]
    assert r.to_reject > 0
    assert not r.lost, (
        f"{len(r.lost)} (record, reader) pairs without a dead letter, of {r.expected_letters}:\n"
        + "\n".join(r.lost[:15])
    )


@apply(FLOOD)
@pytest.mark.parametrize("spec", [_topic_param(s) for s in FLOODED])
def test_dead_letters_carry_the_reason_and_a_detail(flooded: Flood, spec: TopicSpec) -> None:
    r = flooded.results[spec.name]
    assert not r.wrong_reason, f"{len(r.wrong_reason)}:\n" + "\n".join(r.wrong_reason[:15])
    assert not r.unreadable, f"{len(r.unreadable)}:\n" + "\n".join(r.unreadable[:15])


@apply(FLOOD)
def test_records_decode_raises_on_are_dead_lettered_as_not_json(flooded: Flood) -> None:
    raised = [x for r in flooded.results.values() for x in r.codec_raised]
    assert not raised, f"{len(raised)}:\n" + "\n".join(raised[:15])


@apply(FLOOD)
@pytest.mark.parametrize("spec", [_topic_param(s) for s in FLOODED])
def test_valid_foreign_events_are_not_dead_lettered(flooded: Flood, spec: TopicSpec) -> None:
    r = flooded.results[spec.name]
    assert r.sent[fz.VALID] > 0
    assert not r.valid_dead_lettered, (
        f"{len(r.valid_dead_lettered)} valid record(s) dead-lettered:\n"
        + "\n".join(r.valid_dead_lettered[:15])
    )


@apply(FLOOD)
def test_no_dead_letter_for_the_campaigns_own_records(flooded: Flood) -> None:
    stray = flooded.outcome.stray
    assert not stray, [f"{x.source_topic}[{x.partition}]@{x.offset} {x.reason}" for x in stray]


# --- the codec on its own: it must never raise ------------------------------------------------


@dataclass(frozen=True)
class Sample:
    shape: str
    value: bytes

    def __repr__(self) -> str:  # hypothesis prints the failing case: keep it short
        return f"Sample({self.shape!r}, {len(self.value)} bytes: {self.value[:80]!r}...)"


@pytest.mark.unit
@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.sampled_from(FLOODED)
    .flatmap(lambda spec: fz.malformed_value(spec))
    .map(lambda case: Sample(*case))
)
def test_decode_never_raises_on_malformed_objects(sample: Sample) -> None:
    """`schemas.codec.decode` promises never to raise: every consumer (and the compacted-topic
    followers, which do not guard the call) relies on it."""
    raised = fz.decode_raises(sample.value)
    assert raised is None, f"decode raised on a {sample.shape!r} record: {raised}"


# --- a record whose dead letter would be larger than a record may be -------------------------

HUGE_KEY = 800_000  # a legal record (< 1 MiB); its dead letter (key base64) is not


@pytest.mark.integration
@pytest.mark.real_kafka
@pytest.mark.timeout(120)
async def test_a_record_with_a_huge_key_is_dead_lettered_and_the_partition_moves_on(
    broker: BrokerHandle,
) -> None:
    """A garbage value under an 800 kB key (vnfm.replies is written by vendors; any key goes):
    the consume loop must dead-letter it and go on to the record behind it."""
    settings = broker.settings.model_copy(
        update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "partitions": 1}
    )
    await ensure_topics(settings, (t.VNFM_REPLIES,))
    topic = settings.topic(t.VNFM_REPLIES.name)
    producer = make_producer(settings)
    await producer.start()
    group = f"flood-huge-key-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(settings, group, topic)
    try:
        first = await producer.send_and_wait(topic, b"\xffgarbage", key=b"k" * HUGE_KEY)
        second = await producer.send_and_wait(topic, b"\xffgarbage too", key=b"vnfm-1")
        await consumer.start()
        loop = EventConsumer(
            consumer,
            EventPublisher(producer, settings),
            group=group,
            instance=f"{group}/0",
            handlers={},
            registry=CollectorRegistry(),
            retry_backoff_s=0.05,
            retry_backoff_max_s=0.5,
        )
        running = asyncio.create_task(loop.run())
        found: set[int] = set()
        give_up = time.monotonic() + 15
        while found != {first.offset, second.offset} and time.monotonic() < give_up:
            found = {
                letter.offset
                async for letter in _letters(settings)
                if letter.source_topic == topic and letter.reason == "not_utf8"
            }
            await asyncio.sleep(0.5)
        await loop.stop()
        await running
    finally:
        await consumer.stop()
        await producer.stop()
    assert found == {first.offset, second.offset}, (
        f"dead-lettered offsets {sorted(found)} of {[first.offset, second.offset]}: the dead "
        "letter of the huge-key record cannot be published, and the loop retries it for ever"
    )


async def _letters(settings: Any) -> Any:
    async for record in scan(settings, settings.topic(DEAD_LETTERS_TOPIC)):
        with contextlib.suppress(ValueError):
            yield DeadLetter.model_validate_json(record.value or b"")


# --- the compacted views and one bad record -------------------------------------------------

HUGE_INTEGER = b'{"event_type": "NodeAgentHeartbeat", "interval_s": ' + b"7" * 4301 + b"}"
NOT_UTF8_KEY = b"\xff\xfe"
GOOD_VNF = VnfProfile(
    vnf_id="vnf-ok",
    vnfm_id="vnfm-ok",
    redundancy=RedundancyModel.ACTIVE_STANDBY,
    members=("vm-1", "vm-2"),
    min_in_service=1,
    max_unavailable=1,
)


@dataclass(frozen=True)
class ViewCase:
    view: str  # "um-heartbeats", "um-cloud" or "adapter-registry"
    topic: TopicSpec
    bad_key: bytes
    bad_value: bytes | None
    good: Event


VIEW_CASES = [
    pytest.param(
        ViewCase(
            "um-heartbeats",
            t.NODE_HEARTBEATS,
            b"n0",
            HUGE_INTEGER,
            NodeAgentHeartbeat(node_id="n1", agent_id="a", installed_version="1.0", interval_s=5),
        ),
        id="upgrade-manager heartbeats, a 4301-digit number",
    ),
    pytest.param(
        ViewCase(
            "um-cloud",
            t.CLOUD_INVENTORY,
            NOT_UTF8_KEY,
            None,
            NodeInventoryReported(
                node_id="n1",
                failure_domain="fd",
                vcpus=8,
                ram_mb=1024,
                in_maintenance=False,
                vms=(),
            ),
        ),
        id="upgrade-manager inventory, a tombstone keyed by non-UTF-8 bytes",
    ),
    pytest.param(
        ViewCase("um-cloud", t.VNF_REGISTRY, NOT_UTF8_KEY, None, VnfRegistered(vnf=GOOD_VNF)),
        id="upgrade-manager registry, a tombstone keyed by non-UTF-8 bytes",
    ),
    pytest.param(
        ViewCase(
            "adapter-registry", t.VNF_REGISTRY, NOT_UTF8_KEY, None, VnfRegistered(vnf=GOOD_VNF)
        ),
        id="vnfm-adapter registry, a tombstone keyed by non-UTF-8 bytes",
    ),
]


async def _eventually(check: Any, timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.1)):
        if check():
            return True
        await asyncio.sleep(0.1)
    return bool(check())


@pytest.mark.integration
@pytest.mark.real_kafka
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", VIEW_CASES)
async def test_a_compacted_view_gets_past_a_bad_record(
    broker: BrokerHandle, case: ViewCase
) -> None:
    """The views every Upgrade Manager and VNFM adapter keep of a compacted topic read it to
    the end at start, then follow it. A bad record (before the start, and again while
    following) must be skipped or dead-lettered, never end the view: a later good record must
    still show. (Such a record stays on a compacted topic until its key is written again, so
    a start-up that fails on it fails on every restart.)"""
    settings = broker.settings.model_copy(
        update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "partitions": 1}
    )
    await ensure_topics(settings, (t.NODE_HEARTBEATS, t.CLOUD_INVENTORY, t.VNF_REGISTRY))
    topic = settings.topic(case.topic.name)
    producer = make_producer(settings)
    await producer.start()
    problems: list[str] = []
    stop: Any = None
    try:
        await producer.send_and_wait(topic, case.bad_value, key=case.bad_key)
        seen: Any
        try:
            if case.view == "um-heartbeats":
                heartbeats = HeartbeatView(settings)
                await heartbeats.start()
                stop = heartbeats.stop
                seen = lambda: "n1" in heartbeats.agents  # noqa: E731
            elif case.view == "um-cloud":
                cloud = CloudView(settings)
                await cloud.start()
                stop = cloud.stop
                seen = lambda: "n1" in cloud.cloud.hosts or "vnf-ok" in cloud.rules  # noqa: E731
            else:
                registry = VnfRegistry()
                loaded = asyncio.Event()
                reader = asyncio.create_task(KafkaRegistrySource(settings).run(registry, loaded))
                stop = lambda: _cancel(reader)  # noqa: E731
                if not await _eventually(loaded.is_set, 10):
                    raise AssertionError(f"never loaded: {reader.done() and reader.exception()!r}")
                seen = lambda: registry.get("vnf-ok") is not None  # noqa: E731
        except Exception as exc:
            problems.append(f"the view did not start: {type(exc).__name__}: {str(exc)[:100]}")
        else:
            await producer.send_and_wait(topic, case.bad_value, key=case.bad_key)
            await producer.send_and_wait(
                topic, encode(case.good), key=case.topic.key_for(case.good)
            )
            if not await _eventually(seen, 10):
                problems.append("the view stopped at the bad record: a later good one not seen")
    finally:
        if stop is not None:
            with contextlib.suppress(Exception):
                await stop()
        await producer.stop()
    assert not problems, problems


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- the VNFM adapter's core and a registry entry the contract accepts ------------------------


@pytest.mark.unit
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(recovery_s=st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_node_available_for_any_registered_recovery_time(recovery_s: float) -> None:
    """Found by the flood (a fuzz VnfRegistered and a fuzz NodeAvailable naming the same VNF):
    whatever min_recovery_s the registry accepted, NodeAvailable is decided, not raised on."""
    profile = GOOD_VNF.model_copy(update={"min_recovery_s": recovery_s})
    decision = adapter_decide(
        AdapterState(),
        NodeAvailable(node_id="n1", vnf_ids=("vnf-ok",)),
        AdapterContext(now=datetime.now(UTC), registry=VnfRegistry.of([profile])),
    )
    assert [c.event_type for c in decision.commands] == ["NodeAvailable"]
