"""vnfm-check's judging and fixture loading, without a broker."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from escalator import vnfm_check as vc
from schemas.envelope import Event, utcnow
from schemas.events import (
    BusinessMoveRefused,
    MaintenanceDeadlineExtended,
    VnfBusinessMoved,
    VnfMaintenanceNotified,
)
from schemas.types import AffectedVnf, MaintenanceAction, VmBusinessOutcome

pytestmark = pytest.mark.unit

NOTICE = VnfMaintenanceNotified(
    campaign_id="vnfm-check-x",
    notice_id="chk-x-drain",
    vnfm_id="vnfm-a",
    node_id="compute-0-01",
    vnfs=(AffectedVnf(vnf_id="vnf-lb", vm_ids=("vm-1",)),),
    allowed_actions=tuple(MaintenanceAction),
    reply_deadline=utcnow() + timedelta(seconds=10),
)


def seen(event: Event | dict[str, Any], at: float) -> vc.Seen:
    raw = (
        event.model_dump_json().encode() if isinstance(event, Event) else json.dumps(event).encode()
    )
    return vc.seen_from(raw, at)


def moved(*vms: tuple[str, str], **envelope: Any) -> VnfBusinessMoved:
    fields: dict[str, Any] = {
        **NOTICE.caused(),
        "notice_id": NOTICE.notice_id,
        "vnfm_id": "vnfm-a",
        **envelope,
    }
    outcomes = tuple(VmBusinessOutcome(vm_id=v, vnf_id="vnf-lb", outcome=o) for v, o in vms)
    return VnfBusinessMoved(**fields, outcomes=outcomes)


def failed(checks: list[vc.Check]) -> dict[str, str]:
    return {c.name: c.detail for c in checks if not c.passed}


def judge(scenario: str, *items: vc.Seen) -> dict[str, str]:
    return failed(vc.judge_reply(scenario, NOTICE, items, sent_at=0.0, deadline_at=10.0))


def test_a_good_drain_passes() -> None:
    assert judge("drain", seen(moved(("vm-1", "drained")), 1.0)) == {}


def test_no_reply_late_reply_and_wrong_kind() -> None:
    assert "final reply" in judge("drain")
    late = judge("drain", seen(moved(("vm-1", "drained")), 12.5))
    assert late == {"reply before deadline": "2.5 s after the deadline"}
    wrong = judge("drain", seen(moved(("vm-1", "left_for_vim")), 1.0))
    assert wrong == {"expected reply": "expected drained, got vm-1: left_for_vim"}


def test_outcomes_must_match_the_notice_vms_exactly() -> None:
    extra = judge("drain", seen(moved(("vm-1", "drained"), ("vm-9", "drained")), 1.0))
    assert "vm-9" in extra["one outcome per VM of the notice"]
    missing = judge("drain", seen(moved(), 1.0))
    assert "no outcome for vm-1" in missing["one outcome per VM of the notice"]
    twice = judge("drain", seen(moved(("vm-1", "drained"), ("vm-1", "drained")), 1.0))
    assert "several outcomes for vm-1" in twice["one outcome per VM of the notice"]


def test_ids_and_causation_and_a_second_final_reply() -> None:
    foreign = moved(("vm-1", "drained"), vnfm_id="vnfm-b", causation_id=None)
    problems = judge("drain", seen(foreign, 1.0))["notice id, vnfm id, causation"]
    assert "vnfm_id 'vnfm-b'" in problems and "causation_id None" in problems
    two = judge(
        "drain", seen(moved(("vm-1", "drained")), 1.0), seen(moved(("vm-1", "drained")), 2.0)
    )
    assert "2 final replies" in two["one final reply"]


def test_refusal_needs_a_reason_and_a_refusal() -> None:
    refused = BusinessMoveRefused(
        **NOTICE.caused(), notice_id=NOTICE.notice_id, vnfm_id="vnfm-a", reason="busy"
    )
    assert judge("refusal", seen(refused, 1.0)) == {}
    blank = refused.model_dump(mode="json") | {"reason": ""}
    assert "does not match the contract" in judge("refusal", seen(blank, 1.0))["replies decode"]
    spaces = BusinessMoveRefused(
        **NOTICE.caused(), notice_id=NOTICE.notice_id, vnfm_id="vnfm-a", reason="  "
    )
    assert judge("refusal", seen(spaces, 1.0))["expected reply"] == (
        "BusinessMoveRefused without a reason"
    )
    assert (
        "expected BusinessMoveRefused"
        in judge("refusal", seen(moved(("vm-1", "drained")), 1.0))["expected reply"]
    )


def heartbeat(at: float, extend_by_s: float = 3.0) -> vc.Seen:
    return seen(
        MaintenanceDeadlineExtended(
            **NOTICE.caused(), notice_id=NOTICE.notice_id, vnfm_id="vnfm-a", extend_by_s=extend_by_s
        ),
        at,
    )


SPEC = vc.ScenarioSpec(vnf_id="vnf-lb", vm_id="vm-1", extension_max_s=5, hard_timeout_s=20)


def test_heartbeats_extend_the_deadline_within_the_caps() -> None:
    deadline, counted = vc.extended_deadline(
        [heartbeat(1.0, 100), heartbeat(5.0, 3), heartbeat(30.0)],
        sent_at=0.0,
        deadline_at=2.0,
        extension_max_s=5,
        hard_timeout_s=20,
    )
    assert deadline == 8.0 and len(counted) == 2  # 1+5 (capped), then 5+3; 30 is too late
    hard, _ = vc.extended_deadline(
        [heartbeat(t, 5) for t in (1, 5, 9, 13, 17)],
        sent_at=0.0,
        deadline_at=2.0,
        extension_max_s=5,
        hard_timeout_s=20,
    )
    assert hard == 20.0


def test_judge_heartbeat() -> None:
    good = [heartbeat(0.5), heartbeat(2.5), seen(moved(("vm-1", "drained")), 4.0)]
    assert failed(vc.judge_heartbeat(NOTICE, good, sent_at=0.0, deadline_at=2.0, spec=SPEC)) == {}
    silent = [seen(moved(("vm-1", "drained")), 4.0)]
    problems = failed(vc.judge_heartbeat(NOTICE, silent, sent_at=0.0, deadline_at=2.0, spec=SPEC))
    assert "no MaintenanceDeadlineExtended" in problems["heartbeat before deadline"]
    assert "2.0 s after the deadline" in problems["reply before deadline"]


def test_judge_late() -> None:
    assert failed(vc.judge_late(NOTICE, [], sent_at=0.0, expired_at=1.0)) == {}
    after = failed(
        vc.judge_late(NOTICE, [seen(moved(("vm-1", "drained")), 4.0)], sent_at=0.0, expired_at=1.0)
    )
    assert "VnfBusinessMoved" in after["nothing after NoticeExpired"]
    early = failed(
        vc.judge_late(NOTICE, [seen(moved(("vm-1", "drained")), 0.5)], sent_at=0.0, expired_at=1.0)
    )
    assert "before the expiry" in early["still working at expiry"]


def test_replies_are_attributed_by_notice_id_or_causation() -> None:
    assert vc.belongs_to(seen(moved(("vm-1", "drained")), 0), NOTICE)
    wrong_id = seen(moved(("vm-1", "drained"), notice_id="n-typo"), 0)
    assert vc.belongs_to(wrong_id, NOTICE)
    assert "notice_id 'n-typo'" in judge("drain", wrong_id)["notice id, vnfm id, causation"]
    other = seen(moved(("vm-1", "drained"), notice_id="n-other", causation_id=None), 0)
    assert not vc.belongs_to(other, NOTICE)


def test_fixture_loading(tmp_path: Path) -> None:
    toml = tmp_path / "f.toml"
    toml.write_text(
        'vnfm_id = "vnfm-a"\n[scenarios.drain]\nvnf_id = "vnf-lb"\nvm_id = "vm-1"\n'
        '[scenarios.heartbeat]\nvnf_id = "v"\nvm_id = "m"\ndeadline_s = 2\n'
    )
    fixture = vc.load_fixture(toml)
    assert set(fixture.scenarios) == {"drain", "heartbeat"}
    as_json = tmp_path / "f.json"
    as_json.write_text(json.dumps(fixture.model_dump(mode="json")))
    assert vc.load_fixture(as_json) == fixture
    for text, words in (
        ('vnfm_id = "a"\n[scenarios.teleport]\nvnf_id = "v"\nvm_id = "m"\n', "teleport"),
        ('vnfm_id = "a"\n[scenarios.drain]\nvnf_id = "v"\n', "vm_id"),
        ('vnfm_id = "a"\nsurprise = 1\n', "surprise"),
        ("not toml [", "not valid"),
    ):
        toml.write_text(text)
        with pytest.raises(vc.FixtureError, match=words):
            vc.load_fixture(toml)
    with pytest.raises(vc.FixtureError, match="cannot read"):
        vc.load_fixture(tmp_path / "missing.toml")


def test_report_json_and_table() -> None:
    result = vc.ScenarioResult("drain", "n", [vc.Check("x", False, "why")])
    report = vc.CheckReport("vnfm-a", [result, vc.ScenarioResult("refusal", skipped="not in it")])
    data = report.to_json()
    assert data["passed"] is False
    assert data["scenarios"][0]["checks"] == [{"name": "x", "passed": False, "detail": "why"}]
    assert data["scenarios"][1]["passed"] is True
    assert report.table().row_count == 2
