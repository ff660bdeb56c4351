"""Test helpers for the Upgrade Manager's decision core.

`Driver` feeds the core by hand (unit tests). `Sim` is a small simulated world for the property
tests: a model cloud with nodes, VMs and capacity, a model VNFM adapter and model node agents
answer the core's commands, and replies are delivered in any order the topics allow (order kept
per topic and key), with duplicates, lost commands, restarts and Ticks in between.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from schemas import topics
from schemas.envelope import Event
from schemas.events import (
    BusinessMoved,
    BusinessMoveDeadlineExtended,
    BusinessMoveRequested,
    CampaignCompleted,
    CampaignFailed,
    CampaignPolicy,
    NodeAvailable,
    NodeCycleAdvanced,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRefused,
    NodeMaintenanceRequested,
    NodeStep,
    NodeUpgradeAccepted,
    NodeUpgraded,
    NodeUpgradeFailed,
    NodeUpgradeProgressed,
    NodeUpgradeRequested,
    UpgradeRequested,
    VmMigrated,
    VmMigrationFailed,
    VmMigrationRequested,
)
from schemas.types import (
    ArtifactFile,
    BusinessOutcome,
    VersionManifest,
    VmBusinessOutcome,
    VmOnNode,
    VnfmRefusal,
)
from services.upgrade_manager.domain import (
    IN_CYCLE_STEPS,
    AgentStatus,
    CampaignState,
    CampaignStatus,
    Context,
    Decision,
    Input,
    NodeRecord,
    Tick,
    decide,
    recover,
)
from services.upgrade_manager.domain.planner import Cloud, VnfRule

T0 = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
OLD = "29.0.3"
TARGET = "29.1.0"
CAMPAIGN = "cmp-29-1-0"
MANIFEST = VersionManifest(
    version=TARGET,
    files=(
        ArtifactFile(
            name="nova-compute-29.1.0.rpm",
            sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            uri="https://repo.example.net/29.1.0/nova-compute-29.1.0.rpm",
        ),
    ),
)
NEVER_SEEN = T0 - timedelta(days=1)

E = TypeVar("E", bound=Event)


def of_type(events: Iterable[Event], cls: type[E], node_id: str | None = None) -> list[E]:
    return [
        e
        for e in events
        if isinstance(e, cls) and (node_id is None or getattr(e, "node_id", None) == node_id)
    ]


def reply(command: Event, cls: type[E], **fields: Any) -> E:
    """An answer to a command, with the envelope a well-behaved service sets (causation!)."""
    return cls(**command.caused(producer="test"), **fields)


def vm(vm_id: str, vnf_id: str | None = None, *, incoming: bool = False) -> VmOnNode:
    return VmOnNode(vm_id=vm_id, vnf_id=vnf_id, vcpus=2, ram_mb=2048, incoming=incoming)


def outcome(vm_id: str, vnf_id: str | None, what: BusinessOutcome) -> VmBusinessOutcome:
    return VmBusinessOutcome(vm_id=vm_id, vnf_id=vnf_id, outcome=what)


class Driver:
    """Feeds one campaign by hand and keeps what the core emitted."""

    def __init__(
        self,
        nodes: Iterable[str] = ("n1", "n2", "n3"),
        *,
        versions: dict[str, str] | None = None,
        dead: Iterable[str] = (),
        cloud: Cloud | None = None,
        rules: dict[str, VnfRule] | None = None,
    ) -> None:
        self.cloud = cloud
        self.rules = rules or {}
        self.claims: dict[str, str] = {}
        self.now = T0
        self.nodes = tuple(nodes)
        self.versions = {n: OLD for n in self.nodes} | (versions or {})
        self.dead = set(dead)
        self.state: CampaignState | None = None
        self.last = Decision(None)
        self.emitted: list[Event] = []

    def ctx(self) -> Context:
        return Context(
            self.now,
            {
                n: AgentStatus(NEVER_SEEN if n in self.dead else self.now, self.versions[n], 5.0)
                for n in self.nodes
            },
            cloud=self.cloud,
            rules=self.rules,
            max_recovery_s=max((r.min_recovery_s for r in self.rules.values()), default=0.0),
            claims=self.claims,
        )

    def feed(self, event: Input) -> list[Event]:
        self.last = decide(self.state, event, self.ctx())
        self.state = self.last.state
        self.emitted.extend(self.last.commands)
        return list(self.last.commands)

    def request(self, nodes: Iterable[str] | None = None, **policy: Any) -> UpgradeRequested:
        return UpgradeRequested(
            campaign_id=CAMPAIGN,
            manifest=MANIFEST,
            nodes=tuple(nodes) if nodes is not None else None,
            policy=CampaignPolicy(**policy),
            producer="operator-cli",
            occurred_at=self.now,
        )

    def start(self, nodes: Iterable[str] | None = None, **policy: Any) -> list[Event]:
        return self.feed(self.request(nodes if nodes is not None else self.nodes, **policy))

    def tick(self, seconds: float) -> list[Event]:
        self.now += timedelta(seconds=seconds)
        return self.feed(Tick())

    def node(self, node_id: str) -> NodeRecord:
        assert self.state is not None
        return self.state.nodes[node_id]

    def step(self, node_id: str) -> NodeStep:
        return self.node(node_id).step

    @property
    def status(self) -> CampaignStatus:
        assert self.state is not None
        return self.state.campaign.status

    def one(
        self, cls: type[E], node_id: str | None = None, events: Iterable[Event] | None = None
    ) -> E:
        found = of_type(self.last.commands if events is None else events, cls, node_id)
        assert len(found) == 1, f"expected one {cls.__name__} for {node_id}, got {found}"
        return found[0]

    def steps_of(self, node_id: str) -> list[NodeStep]:
        return [e.step for e in of_type(self.emitted, NodeCycleAdvanced, node_id)]

    # --- the happy answers, one node at a time -------------------------------------------

    def enter(self, node_id: str, vms: Iterable[VmOnNode] = ()) -> list[Event]:
        claim = self.latest(NodeMaintenanceRequested, node_id)
        return self.feed(
            reply(
                claim,
                NodeMaintenanceEntered,
                node_id=node_id,
                vms=tuple(vms),
                prior_status="enabled",
            )
        )

    def latest(self, cls: type[E], node_id: str) -> E:
        found = of_type(self.emitted, cls, node_id)
        assert found, f"no {cls.__name__} for {node_id}"
        return found[-1]


# --- the simulated world -------------------------------------------------------------------

ALLOWED_STEPS: dict[NodeStep, frozenset[NodeStep]] = {
    NodeStep.PENDING: frozenset({NodeStep.PENDING, NodeStep.CLAIMING, NodeStep.DONE}),
    NodeStep.CLAIMING: frozenset({NodeStep.NOTIFYING, NodeStep.SKIPPED, NodeStep.RELEASING}),
    # NOTIFYING again: the VNFM deadline was extended (a progress event with a new detail).
    NodeStep.NOTIFYING: frozenset({NodeStep.NOTIFYING, NodeStep.MIGRATING, NodeStep.RELEASING}),
    NodeStep.MIGRATING: frozenset({NodeStep.UPGRADING, NodeStep.RELEASING}),
    NodeStep.UPGRADING: frozenset({NodeStep.RELEASING, NodeStep.FAILED}),
    # PENDING again: a VNFM refused and the node was deferred.
    NodeStep.RELEASING: frozenset(
        {NodeStep.DONE, NodeStep.SKIPPED, NodeStep.FAILED, NodeStep.PENDING}
    ),
}


@dataclass
class SimVm:
    vm_id: str
    vnf_id: str | None
    vcpus: int
    location: str
    # Destination of a migration under way (the VM is still on `location` until it lands).
    flying_to: str | None = None


@dataclass
class SimConfig:
    nodes: int
    spare_nodes: int
    vms: list[list[tuple[str | None, int]]]  # per node: (vnf_id, vcpus)
    capacity: int
    policy: CampaignPolicy
    at_target: set[int] = field(default_factory=set)
    admin_held: set[int] = field(default_factory=set)
    dead_for_s: dict[int, float] = field(default_factory=dict)
    preexisting_flights: int = 0
    all_nodes: bool = False
    p_dup: float = 0.1
    p_drop: float = 0.05
    p_migration_fail: float = 0.1
    p_upgrade_fail: float = 0.1
    p_silent: float = 0.1
    # The model VNFM adapter: how often a request is refused, or its deadline extended first.
    p_refuse: float = 0.0
    p_extend: float = 0.0


@dataclass
class Queued:
    event: Event
    not_before: datetime = T0


class Sim:
    """A campaign run against model services, checking safety after every decision."""

    def __init__(self, cfg: SimConfig, rnd: random.Random) -> None:
        self.cfg = cfg
        self.rnd = rnd
        self.policy = cfg.policy
        self.now = T0
        self.campaign_nodes = [f"compute-{i:02d}" for i in range(cfg.nodes)]
        self.spares = [f"spare-{i:02d}" for i in range(cfg.spare_nodes)]
        self.holder: dict[str, str | None] = {n: None for n in self.campaign_nodes + self.spares}
        for i in cfg.admin_held:
            self.holder[self.campaign_nodes[i]] = "admin"
        self.version = {
            n: TARGET if i in cfg.at_target else OLD for i, n in enumerate(self.campaign_nodes)
        }
        self.dead_until = {
            self.campaign_nodes[i]: T0 + timedelta(seconds=s) for i, s in cfg.dead_for_s.items()
        }
        self.vms: dict[str, SimVm] = {}
        for i, specs in enumerate(cfg.vms):
            for j, (vnf_id, vcpus) in enumerate(specs):
                vm_id = f"vm-{i:02d}-{j}"
                self.vms[vm_id] = SimVm(vm_id, vnf_id, vcpus, self.campaign_nodes[i])
        self._preexisting_flights(cfg.preexisting_flights)
        self.queues: dict[tuple[str, str], deque[Queued]] = {}
        self.seen: set[tuple[str, uuid.UUID]] = set()
        # Migration requests waiting for a VM to leave a node (answered when it lands elsewhere).
        self.leave_waiters: dict[tuple[str, str], list[VmMigrationRequested]] = {}
        # Requests to move a VM off a node it is still flying toward (processed once it lands).
        self.deferred: list[VmMigrationRequested] = []
        # Ground truth kept by the model VNFMs: (node, vm) whose business really moved.
        self.business_moved: set[tuple[str, str]] = set()
        self.entered_listing: dict[str, set[str]] = {}
        # What the core was told, for the checks.
        self.core_saw_migrated: dict[str, set[str]] = {}
        self.state: CampaignState | None = None
        self.log: list[tuple[Input, Context]] = []
        self.emitted: list[Event] = []
        self.by_id: dict[uuid.UUID, Event] = {}

    def _preexisting_flights(self, count: int) -> None:
        # Migrations started before the campaign (by an admin): they race with maintenance.
        nodes = self.campaign_nodes + self.spares
        for vm in list(self.vms.values())[:count]:
            others = [n for n in nodes if n != vm.location]
            if others:
                vm.flying_to = self.rnd.choice(others)

    # --- context and feeding -----------------------------------------------------------

    def agent_live(self, node_id: str) -> bool:
        until = self.dead_until.get(node_id)
        return until is None or self.now >= until

    def ctx(self) -> Context:
        return Context(
            self.now,
            {
                n: AgentStatus(self.now if self.agent_live(n) else NEVER_SEEN, self.version[n], 5.0)
                for n in self.campaign_nodes
            },
        )

    def feed(self, event: Input) -> None:
        ctx = self.ctx()
        before = self.state
        decision = decide(before, event, ctx)
        self.log.append((event, ctx))
        self.state = decision.state
        self.check_identity(before, decision)
        self.check_invariants(ctx, decision)
        self.check_refusal(before, event, decision)
        for command in decision.commands:
            self.publish(command)

    def start(self) -> None:
        request = UpgradeRequested(
            campaign_id=CAMPAIGN,
            manifest=MANIFEST,
            nodes=None if self.cfg.all_nodes else tuple(self.campaign_nodes),
            policy=self.policy,
            occurred_at=self.now,
        )
        self.enqueue(request)

    def enqueue(self, event: Event, not_before: datetime = T0) -> None:
        spec = topics.topic_of(event.event_type, consumer=_consumer(event))
        self.queues.setdefault((spec.name, spec.key_for(event).decode()), deque()).append(
            Queued(event, not_before)
        )

    def publish(self, command: Event) -> None:
        previous = self.by_id.get(command.event_id)
        assert previous is None or previous == command, f"one id, two commands: {command}"
        self.by_id[command.event_id] = command
        self.emitted.append(command)
        if _consumer(command) is not None:
            self.enqueue(command)

    # --- the run -------------------------------------------------------------------------

    def deliverable(self) -> list[deque[Queued]]:
        return [q for q in self.queues.values() if q and q[0].not_before <= self.now]

    def flights(self) -> list[SimVm]:
        return [vm for vm in self.vms.values() if vm.flying_to is not None]

    def run(self, steps: int) -> None:
        self.start()
        for _ in range(steps):
            self.random_action()

    def random_action(self) -> None:
        roll = self.rnd.random()
        ready = self.deliverable()
        if roll < 0.6 and ready:
            self.deliver(self.rnd.choice(ready))
        elif roll < 0.75 and self.flights():
            self.land(self.rnd.choice(self.flights()))
        elif roll < 0.97:
            self.now += timedelta(seconds=self.rnd.choice((1, 2, 5, 10, 30, 120)))
            self.feed(Tick())
        elif self.state is not None:
            for command in recover(self.state, self.ctx()):  # a manager restart
                self.publish(command)

    def finish(self, limit: int = 20_000) -> None:
        """Revive every agent and run until the campaign ends."""
        self.dead_until.clear()
        for _ in range(limit):
            if self.state is not None and self.state.campaign.status.ended:
                return
            ready = self.deliverable()
            if ready:
                self.deliver(self.rnd.choice(ready))
            elif self.flights():
                self.land(self.rnd.choice(self.flights()))
            else:
                self.now += timedelta(seconds=self.rnd.choice((30, 300, 3600)))
                self.feed(Tick())
        raise AssertionError("the campaign did not end")

    def deliver(self, queue: deque[Queued]) -> None:
        item = queue[0] if self.rnd.random() < self.cfg.p_dup else queue.popleft()
        event = item.event
        consumer = _consumer(event)
        if consumer is topics.Service.UPGRADE_MANAGER:
            if isinstance(event, VmMigrated):
                self.core_saw_migrated.setdefault(event.node_id, set()).add(event.vm_id)
            self.feed(event)
        elif consumer is topics.Service.CLOUD_MANAGER:
            self.receive(event, self.cloud)
        elif consumer is topics.Service.VNFM_ADAPTER:
            self.receive(event, self.adapter)
        else:
            self.receive(event, self.agent)

    def receive(self, command: Event, handler: Any) -> None:
        # Receivers deduplicate on event_id; a "lost" command is one the receiver dropped
        # before recording it (crash), so a later duplicate of it is processed.
        key = (command.event_type, command.event_id)
        if key in self.seen:
            return
        if self.rnd.random() < self.cfg.p_drop:
            return
        self.seen.add(key)
        handler(command)

    def answer(self, event: Event, not_before: datetime | None = None) -> None:
        self.enqueue(event, not_before or self.now)

    # --- model cloud ---------------------------------------------------------------------

    def cloud(self, command: Event) -> None:
        if isinstance(command, NodeMaintenanceRequested):
            self.claim(command)
        elif isinstance(command, NodeMaintenanceExitRequested):
            held = self.holder[command.node_id]
            if held == command.holder or held is None:
                self.holder[command.node_id] = None
                self.answer(
                    reply(
                        command,
                        NodeMaintenanceExited,
                        node_id=command.node_id,
                        restored_status="enabled",
                    )
                )
            # held by someone else: a holder-checked release does nothing
        elif isinstance(command, VmMigrationRequested):
            self.migrate(command)

    def claim(self, command: NodeMaintenanceRequested) -> None:
        node_id = command.node_id
        held = self.holder[node_id]
        if held not in (None, command.holder):
            self.answer(
                reply(
                    command,
                    NodeMaintenanceRefused,
                    node_id=node_id,
                    reason="node already in maintenance",
                    current_holder=held,
                )
            )
            return
        self.holder[node_id] = command.holder
        on_node = [vm for vm in self.vms.values() if vm.location == node_id]
        incoming = [vm for vm in self.vms.values() if vm.flying_to == node_id]
        listing = [
            VmOnNode(vm_id=vm.vm_id, vnf_id=vm.vnf_id, vcpus=vm.vcpus, ram_mb=1024)
            for vm in on_node
        ] + [
            VmOnNode(vm_id=vm.vm_id, vnf_id=vm.vnf_id, vcpus=vm.vcpus, ram_mb=1024, incoming=True)
            for vm in incoming
        ]
        self.entered_listing.setdefault(node_id, set()).update(vm.vm_id for vm in listing)
        self.answer(
            reply(
                command,
                NodeMaintenanceEntered,
                node_id=node_id,
                vms=tuple(listing),
                prior_status="enabled",
            )
        )

    def migrate(self, command: VmMigrationRequested) -> None:
        vm = self.vms.get(command.vm_id)
        source = command.node_id
        if vm is None:
            return
        if vm.flying_to == source:
            self.deferred.append(command)  # it must land before it can leave again
        elif vm.location != source:
            self.answer(
                reply(
                    command,
                    VmMigrated,
                    vm_id=vm.vm_id,
                    node_id=source,
                    destination_node_id=vm.location,
                )
            )
        elif vm.flying_to is not None:
            self.leave_waiters.setdefault((vm.vm_id, source), []).append(command)
        else:
            self.place(vm, command)

    def place(self, vm: SimVm, command: VmMigrationRequested) -> None:
        candidates = [
            n
            for n, held in self.holder.items()
            if held is None and n != vm.location and self.free_vcpus(n) >= vm.vcpus
        ]
        if not candidates or self.rnd.random() < self.cfg.p_migration_fail:
            self.answer(
                reply(
                    command,
                    VmMigrationFailed,
                    vm_id=vm.vm_id,
                    node_id=command.node_id,
                    reason="no capacity" if not candidates else "migration error",
                )
            )
            return
        destination = self.rnd.choice(candidates)
        assert self.holder[destination] is None, "never place a VM on a node in maintenance"
        vm.flying_to = destination
        self.leave_waiters.setdefault((vm.vm_id, vm.location), []).append(command)

    def free_vcpus(self, node_id: str) -> int:
        used = sum(
            vm.vcpus
            for vm in self.vms.values()
            if vm.location == node_id or vm.flying_to == node_id
        )
        return self.cfg.capacity - used

    def land(self, vm: SimVm) -> None:
        assert vm.flying_to is not None
        source, vm.location, vm.flying_to = vm.location, vm.flying_to, None
        if self.holder[vm.location] is not None:
            # The race: a migration under way when the node entered maintenance. It must have
            # been reported to whoever claimed the node, so that it is migrated off again.
            assert vm.vm_id in self.entered_listing.get(vm.location, set()) or (
                self.holder[vm.location] == "admin"
            ), f"{vm.vm_id} landed unseen on {vm.location} in maintenance"
        for command in self.leave_waiters.pop((vm.vm_id, source), []):
            self.answer(
                reply(
                    command,
                    VmMigrated,
                    vm_id=vm.vm_id,
                    node_id=source,
                    destination_node_id=vm.location,
                )
            )
        waiting, self.deferred = (
            [c for c in self.deferred if c.vm_id == vm.vm_id],
            [c for c in self.deferred if c.vm_id != vm.vm_id],
        )
        for command in waiting:
            self.migrate(command)

    # --- model VNFM adapter --------------------------------------------------------------

    def adapter(self, command: Event) -> None:
        if not isinstance(command, BusinessMoveRequested):
            return  # NodeAvailable: nothing to answer
        roll = self.rnd.random()
        if roll < self.cfg.p_refuse:
            vnf_ids = tuple(dict.fromkeys(r.vnf_id for r in command.vms if r.vnf_id))
            refused = reply(
                command,
                BusinessMoved,
                node_id=command.node_id,
                outcomes=tuple(
                    VmBusinessOutcome(
                        vm_id=r.vm_id, vnf_id=r.vnf_id, outcome=BusinessOutcome.LEFT_FOR_VIM
                    )
                    for r in command.vms
                ),
                refusals=(VnfmRefusal(vnfm_id="vnfm-x", vnf_ids=vnf_ids, reason="busy"),),
            )
            self.answer(refused)
            return
        not_before: datetime | None = None
        if roll < self.cfg.p_refuse + self.cfg.p_extend:
            # A VNFM heartbeat: the adapter tells the manager, then the answer comes later.
            extra = timedelta(seconds=self.rnd.choice((10, 60, 600)))
            self.answer(
                reply(
                    command,
                    BusinessMoveDeadlineExtended,
                    node_id=command.node_id,
                    deadline=command.deadline + extra,
                    reason="vnfm-x: heartbeat",
                )
            )
            not_before = command.deadline + extra / 2
        mode = self.rnd.choice(("answer", "answer", "partial", "silent"))
        if mode == "silent":
            return
        outcomes = []
        for ref in command.vms:
            if mode == "partial" and self.rnd.random() < 0.5:
                continue  # this VNFM never answered
            what = self.rnd.choice(list(BusinessOutcome))
            if what.business_moved:
                self.business_moved.add((command.node_id, ref.vm_id))
            outcomes.append(VmBusinessOutcome(vm_id=ref.vm_id, vnf_id=ref.vnf_id, outcome=what))
        moved = reply(
            command,
            BusinessMoved,
            node_id=command.node_id,
            outcomes=tuple(outcomes),
            timed_out=mode == "partial",
        )
        self.answer(moved, command.deadline if mode == "partial" else not_before)

    # --- model node agents ---------------------------------------------------------------

    def agent(self, command: Event) -> None:
        assert isinstance(command, NodeUpgradeRequested)
        node_id = command.node_id
        if self.version[node_id] == TARGET:
            self.answer(
                reply(command, NodeUpgraded, node_id=node_id, version=TARGET, applied=False)
            )
            return
        roll = self.rnd.random()
        if roll < self.cfg.p_silent:
            return
        self.answer(reply(command, NodeUpgradeAccepted, node_id=node_id, target_version=TARGET))
        self.answer(
            reply(command, NodeUpgradeProgressed, node_id=node_id, phase="installing", percent=50.0)
        )
        if roll < self.cfg.p_silent + self.cfg.p_upgrade_fail:
            self.answer(reply(command, NodeUpgradeFailed, node_id=node_id, reason="rpm conflict"))
        else:
            self.version[node_id] = TARGET
            self.answer(reply(command, NodeUpgraded, node_id=node_id, version=TARGET))

    # --- checks --------------------------------------------------------------------------

    def check_identity(self, before: CampaignState | None, decision: Decision) -> None:
        after = decision.state
        if before is None or after is None:
            return
        for node_id, record in after.nodes.items():
            if node_id in decision.changed_nodes:
                assert record != before.nodes[node_id]
            else:
                assert record is before.nodes[node_id], f"{node_id} changed unannounced"
        assert (after.campaign is not before.campaign) == decision.campaign_changed
        assert after.plan is before.plan and not decision.plan_changed, "the plan is written once"

    def check_invariants(self, ctx: Context, decision: Decision) -> None:
        state = decision.state
        if state is None or state.campaign.status is CampaignStatus.REJECTED:
            return
        in_cycle = [n for n, r in state.nodes.items() if r.step in IN_CYCLE_STEPS]
        assert len(in_cycle) <= self.policy.max_parallel
        assert set(in_cycle) == set(state.campaign.active)
        for command in decision.commands:
            if isinstance(command, NodeMaintenanceRequested) and command.attempt == 1:
                assert self.agent_live(command.node_id), "claimed a node without a live agent"
            elif isinstance(command, VmMigrationRequested):
                assert command.destination_node_id is None
            elif isinstance(command, NodeUpgradeRequested):
                self.check_empty_enough(command.node_id)

    def check_refusal(self, before: CampaignState | None, event: Input, decision: Decision) -> None:
        """A refusal within max_deferrals releases the node untouched: no migration, no upgrade."""
        if not isinstance(event, BusinessMoved) or not event.refusals or before is None:
            return
        node = before.nodes.get(event.node_id)
        if node is None or node.step is not NodeStep.NOTIFYING or decision.state is None:
            return
        after = decision.state.nodes[event.node_id]
        if after.step is NodeStep.NOTIFYING:
            return  # an answer to an older round's request: ignored
        untouched = node.deferrals < self.policy.max_deferrals
        touched = [
            c
            for c in decision.commands
            if isinstance(c, VmMigrationRequested | NodeUpgradeRequested)
            and c.node_id == event.node_id
        ]
        if untouched:
            assert after.step is NodeStep.RELEASING and after.outcome is NodeStep.PENDING
            assert not touched, f"deferred {event.node_id} was touched: {touched}"

    def check_empty_enough(self, node_id: str) -> None:
        """Only VMs whose business moved may still be on a node whose upgrade starts."""
        assert self.holder[node_id] == CAMPAIGN, "upgrade of a node not in our maintenance"
        # Only this round's requests: a deferred round's failed migrations are given up.
        claims = [
            i
            for i, c in enumerate(self.emitted)
            if isinstance(c, NodeMaintenanceRequested) and c.node_id == node_id
        ]
        this_round = self.emitted[claims[-1] :] if claims else self.emitted
        requested = {c.vm_id for c in of_type(this_round, VmMigrationRequested, node_id)}
        assert requested <= self.core_saw_migrated.get(node_id, set()), "upgrade before migrations"
        for vm in self.vms.values():
            if vm.location == node_id or vm.flying_to == node_id:
                stays = (node_id, vm.vm_id) in self.business_moved
                assert stays and not self.policy.migrate_moved_vms, (
                    f"{vm.vm_id} with live business on {node_id} at its upgrade"
                )

    def steps_by_node(self) -> dict[str, list[NodeStep]]:
        steps: dict[str, list[NodeStep]] = {}
        for event in of_type(self.emitted, NodeCycleAdvanced):
            steps.setdefault(event.node_id, []).append(event.step)
        return steps

    def ending(self) -> CampaignCompleted | CampaignFailed:
        found = of_type(self.emitted, CampaignCompleted) + of_type(self.emitted, CampaignFailed)
        assert len(found) == 1
        ended = found[0]
        assert isinstance(ended, CampaignCompleted | CampaignFailed)
        return ended


def _consumer(event: Event) -> topics.Service | None:
    """Who the simulation hands an event to; None for what is only watched (progress)."""
    match event:
        case NodeMaintenanceRequested() | NodeMaintenanceExitRequested() | VmMigrationRequested():
            return topics.Service.CLOUD_MANAGER
        case BusinessMoveRequested() | NodeAvailable():
            return topics.Service.VNFM_ADAPTER
        case NodeUpgradeRequested():
            return topics.Service.NODE_AGENT
        case _ if event.event_type in _TO_MANAGER:
            return topics.Service.UPGRADE_MANAGER
        case _:
            return None


_TO_MANAGER = {
    "UpgradeRequested",
    "NodeMaintenanceEntered",
    "NodeMaintenanceRefused",
    "NodeMaintenanceExited",
    "VmMigrated",
    "VmMigrationFailed",
    "BusinessMoved",
    "BusinessMoveDeadlineExtended",
    "NodeUpgradeAccepted",
    "NodeUpgradeProgressed",
    "NodeUpgraded",
    "NodeUpgradeFailed",
}
