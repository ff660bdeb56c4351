"""Commands and progress events, built from state alone so that a rebuilt command is identical.

Every id is `command_id(campaign_id, node_id, step, attempt[, vm_id])`: a command re-emitted by
`recover()` or by a replayed input carries the same id, and its receiver sees a duplicate.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    BusinessMoveRequested,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRequested,
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


def step_command_id(plan: CampaignPlan, node_id: str, step: NodeStep, attempt: int) -> uuid.UUID:
    return command_id(plan.campaign_id, node_id, step.value, attempt)


def migration_command_id(plan: CampaignPlan, node_id: str, m: PendingMigration) -> uuid.UUID:
    return command_id(plan.campaign_id, node_id, NodeStep.MIGRATING.value, m.sent.attempt, m.vm_id)


def _env(plan: CampaignPlan, node_id: str, step: NodeStep, sent: Sent) -> dict[str, Any]:
    event_id = step_command_id(plan, node_id, step, sent.attempt)
    return envelope(plan, event_id, sent.at, sent.cause)


def claim_command(plan: CampaignPlan, node_id: str, sent: Sent) -> NodeMaintenanceRequested:
    return NodeMaintenanceRequested(
        **_env(plan, node_id, NodeStep.CLAIMING, sent),
        node_id=node_id,
        holder=plan.campaign_id,
        attempt=sent.attempt,
    )


def vms_to_notify(node: NodeRecord) -> tuple[VmRef, ...]:
    """The VMs some VNFM can be asked about; VMs without a VNF are left to the VIM."""
    return tuple(
        VmRef(vm_id=vm.vm_id, vnf_id=vm.vnf_id) for vm in node.vms or () if vm.vnf_id is not None
    )


def notify_command(plan: CampaignPlan, node: NodeRecord, sent: Sent) -> BusinessMoveRequested:
    assert node.vnfm_deadline is not None, "NOTIFYING always records the VNFM deadline"
    return BusinessMoveRequested(
        **_env(plan, node.node_id, NodeStep.NOTIFYING, sent),
        node_id=node.node_id,
        vms=vms_to_notify(node),
        deadline=node.vnfm_deadline,
        attempt=sent.attempt,
    )


def migrate_command(plan: CampaignPlan, node_id: str, m: PendingMigration) -> VmMigrationRequested:
    # No destination on purpose: placement is the Cloud Manager's, which knows capacity and
    # which nodes are in maintenance at the moment it places.
    return VmMigrationRequested(
        **envelope(plan, migration_command_id(plan, node_id, m), m.sent.at, m.sent.cause),
        vm_id=m.vm_id,
        node_id=node_id,
        destination_node_id=None,
        attempt=m.sent.attempt,
    )


def upgrade_command(plan: CampaignPlan, node_id: str, sent: Sent) -> NodeUpgradeRequested:
    assert plan.manifest is not None, "a running campaign has a manifest"
    return NodeUpgradeRequested(
        **_env(plan, node_id, NodeStep.UPGRADING, sent),
        node_id=node_id,
        manifest=plan.manifest,
        attempt=sent.attempt,
    )


def release_command(plan: CampaignPlan, node_id: str, sent: Sent) -> NodeMaintenanceExitRequested:
    return NodeMaintenanceExitRequested(
        **_env(plan, node_id, NodeStep.RELEASING, sent),
        node_id=node_id,
        holder=plan.campaign_id,
        attempt=sent.attempt,
    )


def in_flight_commands(plan: CampaignPlan, node: NodeRecord) -> list[Event]:
    """The commands a node in a waiting step is waiting on, rebuilt with their original ids."""
    if node.step is NodeStep.MIGRATING:
        return [migrate_command(plan, node.node_id, m) for m in node.migrations]
    if node.sent is None:
        return []
    sent = node.sent
    match node.step:
        case NodeStep.CLAIMING:
            return [claim_command(plan, node.node_id, sent)]
        case NodeStep.NOTIFYING:
            return [notify_command(plan, node, sent)]
        case NodeStep.UPGRADING:
            return [upgrade_command(plan, node.node_id, sent)]
        case NodeStep.RELEASING:
            return [release_command(plan, node.node_id, sent)]
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
