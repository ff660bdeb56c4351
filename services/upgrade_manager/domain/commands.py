"""Commands and progress events, built from state alone so that a rebuilt command is identical.

Every id is `command_id(campaign_id, node_id, step, attempt[, vm_id])`: a command re-emitted by
`recover()` or by a replayed input carries the same id, and its receiver sees a duplicate.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoveRequested,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
    NodeRollbackRequested,
    NodeStep,
    NodeUpgradeRequested,
    VmMigrationRequested,
)
from schemas.types import VmRef

from .state import CampaignPlan, NodeRecord, PendingMigration, Sent

PRODUCER = "upgrade-manager"
# The id segment of the NodeAvailable notice (it belongs to no waiting step).
AVAILABLE = "available"
DETAIL_MAX = 2000


def envelope(
    plan: CampaignPlan, event_id: uuid.UUID, at: datetime, cause: uuid.UUID | None
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "campaign_id": plan.campaign_id,
        "correlation_id": plan.correlation_id,
        "causation_id": cause,
        "producer": PRODUCER,
        "occurred_at": at,
    }


def round_part(deferrals: int) -> tuple[str, ...]:
    """The id segment of a node's cycle after `deferrals` deferrals: none for the first cycle
    (ids as before deferrals existed), so each retried cycle's commands are new commands for
    their receivers rather than duplicates of the deferred cycle's."""
    return (f"round-{deferrals}",) if deferrals else ()


def step_command_id(
    plan: CampaignPlan, node_id: str, step: NodeStep, attempt: int, deferrals: int = 0
) -> uuid.UUID:
    return command_id(plan.campaign_id, node_id, step.value, attempt, *round_part(deferrals))


def migration_command_id(
    plan: CampaignPlan, node_id: str, m: PendingMigration, deferrals: int = 0
) -> uuid.UUID:
    return command_id(
        plan.campaign_id,
        node_id,
        NodeStep.MIGRATING.value,
        m.sent.attempt,
        m.vm_id,
        *round_part(deferrals),
    )


def _env(
    plan: CampaignPlan, node_id: str, step: NodeStep, sent: Sent, deferrals: int
) -> dict[str, Any]:
    event_id = step_command_id(plan, node_id, step, sent.attempt, deferrals)
    return envelope(plan, event_id, sent.at, sent.cause)


def claim_command(
    plan: CampaignPlan, node_id: str, sent: Sent, deferrals: int = 0
) -> NodeMaintenanceRequested:
    return NodeMaintenanceRequested(
        **_env(plan, node_id, NodeStep.CLAIMING, sent, deferrals),
        node_id=node_id,
        holder=plan.campaign_id,
        attempt=sent.attempt,
    )


def vms_to_notify(node: NodeRecord) -> tuple[VmRef, ...]:
    """The VMs some VNFM can be asked about; VMs without a VNF are left to the VIM."""
    return tuple(
        VmRef(vm_id=vm.vm_id, vnf_id=vm.vnf_id) for vm in node.vms or () if vm.vnf_id is not None
    )


def notify_attempt(node: NodeRecord, sent: Sent) -> int:
    """The `attempt` of a node's BusinessMoveRequested: higher in every retried cycle, so that the
    VNFM adapter sees a new request (and sends notices with new ids) after a deferral."""
    return sent.attempt + node.deferrals


def notify_command(plan: CampaignPlan, node: NodeRecord, sent: Sent) -> BusinessMoveRequested:
    assert node.vnfm_deadline is not None, "NOTIFYING always records the VNFM deadline"
    policy = plan.policy
    hard = sent.at + timedelta(seconds=policy.vnfm_hard_timeout_s)
    return BusinessMoveRequested(
        **_env(plan, node.node_id, NodeStep.NOTIFYING, sent, node.deferrals),
        node_id=node.node_id,
        vms=vms_to_notify(node),
        deadline=node.vnfm_deadline,
        attempt=notify_attempt(node, sent),
        extension_max_s=policy.vnfm_extension_max_s,
        hard_deadline=max(hard, node.vnfm_deadline),
    )


def migrate_command(
    plan: CampaignPlan, node_id: str, m: PendingMigration, deferrals: int = 0
) -> VmMigrationRequested:
    # The planner's destination is a preference the Cloud Manager checks against the cloud as
    # it is at that moment; a retry names none, so the Cloud Manager places the VM outside the
    # destinations that failed.
    return VmMigrationRequested(
        **envelope(
            plan, migration_command_id(plan, node_id, m, deferrals), m.sent.at, m.sent.cause
        ),
        vm_id=m.vm_id,
        node_id=node_id,
        destination_node_id=m.destination,
        avoid_destinations=m.avoid,
        attempt=m.sent.attempt,
    )


def rollback_command(
    plan: CampaignPlan, node_id: str, sent: Sent, deferrals: int = 0
) -> NodeRollbackRequested:
    event_id = command_id(plan.campaign_id, node_id, ROLLBACK, sent.attempt, *round_part(deferrals))
    return NodeRollbackRequested(
        **envelope(plan, event_id, sent.at, sent.cause),
        node_id=node_id,
        target_version=plan.target_version,
        attempt=sent.attempt,
    )


# The id part of rollback commands (the node stays in its UPGRADING step while rolling back).
ROLLBACK = "rollback"


def upgrade_command(
    plan: CampaignPlan, node_id: str, sent: Sent, deferrals: int = 0
) -> NodeUpgradeRequested:
    assert plan.manifest is not None, "a running campaign has a manifest"
    return NodeUpgradeRequested(
        **_env(plan, node_id, NodeStep.UPGRADING, sent, deferrals),
        node_id=node_id,
        manifest=plan.manifest,
        attempt=sent.attempt,
    )


def release_command(
    plan: CampaignPlan, node_id: str, sent: Sent, deferrals: int = 0
) -> NodeMaintenanceExitRequested:
    return NodeMaintenanceExitRequested(
        **_env(plan, node_id, NodeStep.RELEASING, sent, deferrals),
        node_id=node_id,
        holder=plan.campaign_id,
        attempt=sent.attempt,
    )


def in_flight_commands(plan: CampaignPlan, node: NodeRecord) -> list[Event]:
    """The commands a node in a waiting step is waiting on, rebuilt with their original ids."""
    r = node.deferrals
    if node.step is NodeStep.MIGRATING:
        return [migrate_command(plan, node.node_id, m, r) for m in node.migrations]
    if node.sent is None:
        return []
    sent = node.sent
    match node.step:
        case NodeStep.CLAIMING:
            return [claim_command(plan, node.node_id, sent, r)]
        case NodeStep.NOTIFYING:
            return [notify_command(plan, node, sent)]
        case NodeStep.UPGRADING if node.rolling_back:
            return [rollback_command(plan, node.node_id, sent, r)]
        case NodeStep.UPGRADING:
            return [upgrade_command(plan, node.node_id, sent, r)]
        case NodeStep.RELEASING:
            return [release_command(plan, node.node_id, sent, r)]
        case _:
            return []


def clip(detail: str) -> str:
    return detail if len(detail) <= DETAIL_MAX else detail[: DETAIL_MAX - 1] + "…"


def listing(items: tuple[str, ...] | list[str], limit: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e (+7 more)': readable details at any campaign size."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (+{len(items) - limit} more)"


def clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%SZ")
