"""`escalator vnfm-check`: a conformance checker that VNFM vendors run against their own VNFM.

The checker plays the VIM's side of the contract on a Kafka broker. It publishes its own
`VnfMaintenanceNotified` notices on `vnfm.notices` (keyed by the VNFM id, with its own deadlines),
reads `vnfm.replies`, and judges what comes back. The VNFM under test is told nothing: it must
simply be running, subscribed to `vnfm.notices`, with the world in the state the fixture says.

## The fixture (TOML or JSON)

```toml
vnfm_id = "vnfm-a"          # the VNFM under test
node_id = "compute-0-03"    # default node named in the notices (per scenario: node_id)
deadline_s = 30             # default reply deadline of a notice

[scenarios.switch_over]     # an active-standby VNF's ACTIVE member: expect switched_over
vnf_id = "vnf-as-1"
vm_id = "vm-0003"

[scenarios.drain]           # a load-balanced member carrying load: expect drained
vnf_id = "vnf-lb-1"
vm_id = "vm-0010"

[scenarios.refusal]         # a VNF the vendor put in a state where it must refuse:
vnf_id = "vnf-as-2"         # expect BusinessMoveRefused with a non-blank reason
vm_id = "vm-0020"

[scenarios.heartbeat]       # a VNF whose move takes longer than deadline_s (short, default 3):
vnf_id = "vnf-lb-2"         # expect MaintenanceDeadlineExtended before the deadline, then
vm_id = "vm-0031"           # a final VnfBusinessMoved before the extended deadline
deadline_s = 3
extension_max_s = 60        # the most one heartbeat extends (as the VIM caps it)
hard_timeout_s = 300        # no extension beyond the notice's send time plus this

[scenarios.late_reply]      # a VNF whose move takes longer than expire_after_s: the checker
vnf_id = "vnf-lb-3"         # sends NoticeExpired after expire_after_s and watches quiet_s
vm_id = "vm-0040"           # seconds: nothing may come for the notice after the expiry
expire_after_s = 1
quiet_s = 10
```

Scenarios left out of the fixture are reported as skipped (they do not fail the run). The
per-scenario `expect` overrides the expected outcome of a `VnfBusinessMoved` (e.g. `own_action`).

## The rules checked

For each notice: a final reply (`VnfBusinessMoved` or `BusinessMoveRefused`) arrives before the
(possibly extended) deadline; it decodes against the contract; it names the notice, the VNFM,
and carries the notice's `event_id` as `causation_id`; there is exactly one final reply; a
`VnfBusinessMoved` has exactly one outcome per VM of the notice and nothing else; the reply is of
the kind the scenario expects; and nothing at all comes for a notice after its `NoticeExpired`.

Exit code: 0 if every check of the scenarios run passed, 1 otherwise, 2 on a bad fixture.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table

from escalator.settings import KafkaSettings
from schemas.codec import InvalidEvent, decode
from schemas.envelope import Event, utcnow
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    NoticeExpired,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
)
from schemas.types import (
    AffectedVnf,
    BusinessOutcome,
    MaintenanceAction,
    NodeId,
    VmId,
    VnfId,
    VnfmId,
)

SCENARIOS: tuple[str, ...] = ("switch_over", "drain", "refusal", "heartbeat", "late_reply")
EXPECTED_OUTCOME = {"switch_over": BusinessOutcome.SWITCHED_OVER, "drain": BusinessOutcome.DRAINED}
DEFAULT_DEADLINE_S = {"heartbeat": 3.0}
GRACE_S = 1.0  # how long after a deadline a reply is still waited for (then reported late)
SETTLE_S = 1.0  # how long after the final reply the checker keeps listening for extra replies
EXPIRY_GRACE_S = 0.5  # in flight when NoticeExpired was published: not counted as after expiry
FINAL_TYPES = ("VnfBusinessMoved", "BusinessMoveRefused")


class ScenarioSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vnf_id: VnfId
    vm_id: VmId
    node_id: NodeId | None = None
    deadline_s: float | None = Field(default=None, gt=0, le=3600)
    expect: BusinessOutcome | None = None
    extension_max_s: float = Field(default=60.0, gt=0, le=24 * 3600)
    hard_timeout_s: float = Field(default=300.0, gt=0, le=48 * 3600)
    expire_after_s: float = Field(default=1.0, gt=0, le=3600)
    quiet_s: float = Field(default=10.0, gt=0, le=3600)


class CheckFixture(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vnfm_id: VnfmId
    node_id: NodeId = "vnfm-check-node"
    deadline_s: float = Field(default=30.0, gt=0, le=3600)
    scenarios: dict[str, ScenarioSpec] = Field(default_factory=dict)

    def model_post_init(self, _context: Any) -> None:
        unknown = sorted(set(self.scenarios) - set(SCENARIOS))
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")


class FixtureError(ValueError):
    pass


def load_fixture(path: Path) -> CheckFixture:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FixtureError(f"cannot read fixture {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FixtureError(f"fixture {path} is not valid TOML/JSON: {exc}") from None
    try:
        return CheckFixture.model_validate(data)
    except (ValidationError, ValueError) as exc:
        raise FixtureError(f"fixture {path}: {exc}") from None


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    scenario: str
    notice_id: str = ""
    checks: list[Check] = field(default_factory=list)
    skipped: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.skipped is not None or all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "notice_id": self.notice_id,
            "passed": self.passed,
            "skipped": self.skipped,
            "duration_s": round(self.duration_s, 2),
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
        }


@dataclass
class CheckReport:
    vnfm_id: str
    results: list[ScenarioResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "vnfm_id": self.vnfm_id,
            "passed": self.passed,
            "scenarios": [r.to_json() for r in self.results],
        }

    def table(self) -> Table:
        table = Table(title=f"vnfm-check: {self.vnfm_id}", title_justify="left")
        table.add_column("scenario")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for result in self.results:
            if result.skipped is not None:
                table.add_row(result.scenario, "-", "[yellow]SKIP[/]", result.skipped)
                continue
            for i, check in enumerate(result.checks):
                table.add_row(
                    result.scenario if i == 0 else "",
                    check.name,
                    "[green]PASS[/]" if check.passed else "[bold red]FAIL[/]",
                    check.detail,
                )
        return table


# --- what was seen -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One record read from vnfm.replies, with when the checker saw it (monotonic)."""

    at: float
    raw: bytes
    event: Event | InvalidEvent
    fields: dict[str, Any]

    @property
    def event_type(self) -> str | None:
        value = self.fields.get("event_type")
        return value if isinstance(value, str) else None

    @property
    def event_id(self) -> str:
        return str(self.fields.get("event_id"))

    @property
    def valid(self) -> bool:
        return not isinstance(self.event, InvalidEvent)

    def describe(self) -> str:
        return f"{self.event_type or '?'} {self.event_id}"


def seen_from(raw: bytes, at: float) -> Seen:
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            fields = {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        fields = {}
    return Seen(at, raw, decode(raw), fields)


def belongs_to(seen: Seen, notice: VnfMaintenanceNotified) -> bool:
    """A reply names the notice, or carries its event id as causation."""
    return seen.fields.get("notice_id") == notice.notice_id or seen.fields.get(
        "causation_id"
    ) == str(notice.event_id)


# --- judging (pure: notice + what was seen + times -> checks) ----------------------------------


def _late_by(at: float, deadline: float) -> str:
    return f"{at - deadline:.1f} s after the deadline"


def _finals(seen: Sequence[Seen]) -> list[Seen]:
    return [s for s in seen if s.event_type in FINAL_TYPES]


def judge_reply(
    scenario: str,
    notice: VnfMaintenanceNotified,
    seen: Sequence[Seen],
    *,
    sent_at: float,
    deadline_at: float,
    expect: BusinessOutcome | None = None,
) -> list[Check]:
    """Checks on the final reply of a notice (every scenario but late_reply)."""
    checks: list[Check] = []
    invalid = [s for s in seen if not s.valid]
    finals = _finals(seen)
    valid_finals = [s for s in finals if s.valid]
    if invalid:
        first = invalid[0]
        checks.append(
            Check(
                "replies decode",
                False,
                f"{first.event_type or 'a record'} for the notice does not match the contract: "
                f"{first.event}",
            )
        )
    else:
        checks.append(Check("replies decode", True))
    if not finals:
        waited = deadline_at + GRACE_S - sent_at
        checks.append(Check("final reply", False, f"no reply for the notice within {waited:.1f} s"))
        return checks
    first = finals[0]
    if first.at <= deadline_at:
        checks.append(Check("reply before deadline", True, f"after {first.at - sent_at:.1f} s"))
    else:
        checks.append(Check("reply before deadline", False, _late_by(first.at, deadline_at)))
    distinct = list(dict.fromkeys(s.event_id for s in finals))
    if len(distinct) == 1:
        checks.append(Check("one final reply", True))
    else:
        kinds = ", ".join(s.describe() for s in finals)
        checks.append(Check("one final reply", False, f"{len(distinct)} final replies: {kinds}"))
    if not valid_finals:
        return checks
    reply = valid_finals[0].event
    assert isinstance(reply, VnfBusinessMoved | BusinessMoveRefused)
    checks.append(_ids_check(notice, reply))
    if isinstance(reply, VnfBusinessMoved):
        checks.append(_outcomes_check(notice, reply))
    checks.append(_kind_check(scenario, reply, notice, expect))
    return checks


def _ids_check(notice: VnfMaintenanceNotified, reply: Event) -> Check:
    problems = []
    if getattr(reply, "notice_id", None) != notice.notice_id:
        problems.append(f"notice_id {getattr(reply, 'notice_id', None)!r} != {notice.notice_id!r}")
    if getattr(reply, "vnfm_id", None) != notice.vnfm_id:
        problems.append(f"vnfm_id {getattr(reply, 'vnfm_id', None)!r} != {notice.vnfm_id!r}")
    if reply.causation_id != notice.event_id:
        problems.append(
            f"causation_id {reply.causation_id} is not the notice's event_id {notice.event_id}"
        )
    return Check("notice id, vnfm id, causation", not problems, "; ".join(problems))


def _outcomes_check(notice: VnfMaintenanceNotified, reply: VnfBusinessMoved) -> Check:
    expected = {vm: a.vnf_id for a in notice.vnfs for vm in a.vm_ids}
    got = [o.vm_id for o in reply.outcomes]
    problems = []
    foreign = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    repeated = sorted({vm for vm in got if got.count(vm) > 1})
    if foreign:
        problems.append(f"outcomes for VMs not in the notice: {', '.join(foreign)}")
    if missing:
        problems.append(f"no outcome for {', '.join(missing)}")
    if repeated:
        problems.append(f"several outcomes for {', '.join(repeated)}")
    for o in reply.outcomes:
        if o.vm_id in expected and o.vnf_id is not None and o.vnf_id != expected[o.vm_id]:
            problems.append(f"{o.vm_id} is in {expected[o.vm_id]}, the reply says {o.vnf_id}")
    return Check("one outcome per VM of the notice", not problems, "; ".join(problems))


def _kind_check(
    scenario: str, reply: Event, notice: VnfMaintenanceNotified, expect: BusinessOutcome | None
) -> Check:
    name = "expected reply"
    if scenario == "refusal":
        if not isinstance(reply, BusinessMoveRefused):
            return Check(name, False, f"expected BusinessMoveRefused, got {_summary(reply)}")
        if not reply.reason.strip():
            return Check(name, False, "BusinessMoveRefused without a reason")
        return Check(name, True, f"refused: {reply.reason[:80]}")
    if isinstance(reply, BusinessMoveRefused):
        return Check(name, False, f"expected a VnfBusinessMoved, got {_summary(reply)}")
    assert isinstance(reply, VnfBusinessMoved)
    wanted = expect or EXPECTED_OUTCOME.get(scenario)
    if wanted is None:
        return Check(name, True, _summary(reply))
    vms = {vm for a in notice.vnfs for vm in a.vm_ids}
    wrong = [o for o in reply.outcomes if o.vm_id in vms and o.outcome is not wanted]
    if wrong:
        listed = ", ".join(f"{o.vm_id}: {o.outcome.value}" for o in wrong)
        return Check(name, False, f"expected {wanted.value}, got {listed}")
    return Check(name, True, f"{wanted.value}")


def _summary(reply: Event) -> str:
    if isinstance(reply, VnfBusinessMoved):
        return (
            "VnfBusinessMoved ("
            + ", ".join(f"{o.vm_id}: {o.outcome.value}" for o in reply.outcomes)
            + ")"
        )
    if isinstance(reply, BusinessMoveRefused):
        return f"BusinessMoveRefused ({reply.reason[:60]!r})"
    return reply.event_type


def extended_deadline(
    seen: Iterable[Seen],
    *,
    sent_at: float,
    deadline_at: float,
    extension_max_s: float,
    hard_timeout_s: float,
) -> tuple[float, list[Seen]]:
    """The deadline after the heartbeats (those that came before the deadline then in force
    count; each extends to its arrival + min(extend_by_s, extension_max_s), never beyond
    sent_at + hard_timeout_s). Returns it with the heartbeats that counted."""
    current = deadline_at
    counted: list[Seen] = []
    hard = sent_at + hard_timeout_s
    for s in sorted(seen, key=lambda x: x.at):
        if not (s.valid and isinstance(s.event, MaintenanceDeadlineExtended)):
            continue
        if s.at > current:
            continue
        counted.append(s)
        current = min(max(current, s.at + min(s.event.extend_by_s, extension_max_s)), hard)
    return current, counted


def judge_heartbeat(
    notice: VnfMaintenanceNotified,
    seen: Sequence[Seen],
    *,
    sent_at: float,
    deadline_at: float,
    spec: ScenarioSpec,
) -> list[Check]:
    extended, counted = extended_deadline(
        seen,
        sent_at=sent_at,
        deadline_at=deadline_at,
        extension_max_s=spec.extension_max_s,
        hard_timeout_s=spec.hard_timeout_s,
    )
    heartbeats = [s for s in seen if s.event_type == "MaintenanceDeadlineExtended"]
    if counted:
        first = counted[0]
        ids = _ids_check(notice, first.event)  # type: ignore[arg-type]
        detail = (
            f"{len(counted)} heartbeat(s), first after {first.at - sent_at:.1f} s; "
            f"deadline moved by {extended - deadline_at:.1f} s"
        )
        checks = [Check("heartbeat before deadline", True, detail)]
        if not ids.passed:
            checks.append(Check("heartbeat ids", False, ids.detail))
    elif heartbeats:
        late = heartbeats[0]
        checks = [
            Check(
                "heartbeat before deadline",
                False,
                f"first heartbeat {_late_by(late.at, deadline_at)}"
                if late.valid
                else f"heartbeat does not match the contract: {late.event}",
            )
        ]
    else:
        checks = [
            Check(
                "heartbeat before deadline",
                False,
                f"no MaintenanceDeadlineExtended within the {deadline_at - sent_at:.1f} s deadline",
            )
        ]
    return checks + judge_reply(
        "heartbeat", notice, seen, sent_at=sent_at, deadline_at=extended, expect=spec.expect
    )


def judge_late(
    notice: VnfMaintenanceNotified, seen: Sequence[Seen], *, sent_at: float, expired_at: float
) -> list[Check]:
    before = [s for s in _finals(seen) if s.at < expired_at]
    after = [s for s in seen if s.at > expired_at + EXPIRY_GRACE_S]
    checks = []
    if before:
        checks.append(
            Check(
                "still working at expiry",
                False,
                f"the VNFM answered after {before[0].at - sent_at:.1f} s, before the expiry: "
                "the fixture must name a VNF whose move takes longer than expire_after_s",
            )
        )
    else:
        checks.append(Check("still working at expiry", True))
    if after:
        listed = ", ".join(f"{s.describe()} {s.at - expired_at:.1f} s after" for s in after[:3])
        checks.append(Check("nothing after NoticeExpired", False, listed))
    else:
        checks.append(Check("nothing after NoticeExpired", True))
    return checks


# --- running against a broker ------------------------------------------------------------------


class RepliesReader:
    """Reads vnfm.replies from its end at start, keeping every record with its arrival time."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.seen: list[Seen] = []
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        from aiokafka.structs import TopicPartition

        from escalator.bus import make_consumer, topic_partitions
        from schemas.topics import VNFM_REPLIES

        name = self.kafka.topic(VNFM_REPLIES.name)
        self._consumer = make_consumer(self.kafka, None)
        await self._consumer.start()
        parts = await topic_partitions(self._consumer, name, timeout_s=10.0)
        tps = [TopicPartition(name, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    if record.value is not None:
                        self.seen.append(seen_from(record.value, now))
                        self._arrived.set()

    async def wait(self, until: float) -> None:
        """Wait for the next record or until the monotonic time `until`."""
        self._arrived.clear()
        left = until - time.monotonic()
        if left <= 0:
            return
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout=left)
        except TimeoutError:
            pass

    def of(self, notice: VnfMaintenanceNotified) -> list[Seen]:
        return [s for s in self.seen if belongs_to(s, notice)]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


class Checker:
    def __init__(self, kafka: KafkaSettings, fixture: CheckFixture, *, run_id: str | None = None):
        self.kafka = kafka
        self.fixture = fixture
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.campaign_id = f"vnfm-check-{self.run_id}"
        self._publisher: Any = None
        self.replies = RepliesReader(kafka)

    def notice_for(
        self, scenario: str, spec: ScenarioSpec, deadline_s: float
    ) -> VnfMaintenanceNotified:
        return VnfMaintenanceNotified(
            campaign_id=self.campaign_id,
            notice_id=f"chk-{self.run_id}-{scenario}",
            vnfm_id=self.fixture.vnfm_id,
            node_id=spec.node_id or self.fixture.node_id,
            vnfs=(AffectedVnf(vnf_id=spec.vnf_id, vm_ids=(spec.vm_id,)),),
            allowed_actions=tuple(MaintenanceAction),
            reply_deadline=utcnow() + timedelta(seconds=deadline_s),
            producer=f"vnfm-check/{self.run_id}",
        )

    async def run(self, scenarios: Sequence[str] = SCENARIOS) -> CheckReport:
        from escalator.bus import EventPublisher, ensure_topics, make_producer
        from schemas.topics import VNFM_NOTICES, VNFM_REPLIES

        await ensure_topics(self.kafka, (VNFM_NOTICES, VNFM_REPLIES))
        producer = make_producer(self.kafka)
        await producer.start()
        self._publisher = EventPublisher(producer, self.kafka)
        results: list[ScenarioResult] = []
        try:
            await self.replies.start()
            for scenario in scenarios:
                spec = self.fixture.scenarios.get(scenario)
                if spec is None:
                    results.append(ScenarioResult(scenario, skipped="not in the fixture"))
                    continue
                results.append(await self.run_one(scenario, spec))
        finally:
            await self.replies.stop()
            await producer.stop()
        return CheckReport(self.fixture.vnfm_id, results)

    async def _publish(self, event: Event) -> float:
        from schemas.topics import VNFM_NOTICES

        await self._publisher.publish(event, VNFM_NOTICES)
        return time.monotonic()

    async def run_one(self, scenario: str, spec: ScenarioSpec) -> ScenarioResult:
        started = time.monotonic()
        deadline_s = spec.deadline_s or DEFAULT_DEADLINE_S.get(scenario, self.fixture.deadline_s)
        notice = self.notice_for(scenario, spec, deadline_s)
        result = ScenarioResult(scenario, notice.notice_id)
        sent_at = await self._publish(notice)
        deadline_at = sent_at + deadline_s
        if scenario == "late_reply":
            await asyncio.sleep(max(0.0, sent_at + spec.expire_after_s - time.monotonic()))
            expired = NoticeExpired(
                **notice.caused(producer=notice.producer),
                notice_id=notice.notice_id,
                vnfm_id=notice.vnfm_id,
                node_id=notice.node_id,
            )
            expired_at = await self._publish(expired)
            await asyncio.sleep(spec.quiet_s)
            result.checks = judge_late(
                notice, self.replies.of(notice), sent_at=sent_at, expired_at=expired_at
            )
        else:
            await self._wait_for_final(notice, spec, scenario, sent_at, deadline_at)
            seen = self.replies.of(notice)
            if scenario == "heartbeat":
                result.checks = judge_heartbeat(
                    notice, seen, sent_at=sent_at, deadline_at=deadline_at, spec=spec
                )
            else:
                result.checks = judge_reply(
                    scenario,
                    notice,
                    seen,
                    sent_at=sent_at,
                    deadline_at=deadline_at,
                    expect=spec.expect,
                )
        result.duration_s = time.monotonic() - started
        return result

    async def _wait_for_final(
        self,
        notice: VnfMaintenanceNotified,
        spec: ScenarioSpec,
        scenario: str,
        sent_at: float,
        deadline_at: float,
    ) -> None:
        while True:
            seen = self.replies.of(notice)
            current = deadline_at
            if scenario == "heartbeat":
                current, _ = extended_deadline(
                    seen,
                    sent_at=sent_at,
                    deadline_at=deadline_at,
                    extension_max_s=spec.extension_max_s,
                    hard_timeout_s=spec.hard_timeout_s,
                )
            finals = _finals(seen)
            if finals:
                settle_until = finals[0].at + SETTLE_S
                while time.monotonic() < settle_until:
                    await self.replies.wait(settle_until)
                return
            give_up = current + GRACE_S
            if time.monotonic() >= give_up:
                return
            await self.replies.wait(give_up)


async def run_check(
    kafka: KafkaSettings, fixture: CheckFixture, scenarios: Sequence[str] = SCENARIOS
) -> CheckReport:
    return await Checker(kafka, fixture).run(scenarios)
