"""The pure decision core of the Cloud Manager: command + what the cloud answered -> next step.

The adapter asks the backend, hands the answer (a value, never an exception) to one of these
functions, and does what it returns: another backend call, or `Reply(event)` to publish on
CLOUD_EVENTS. Every reply carries the command's campaign and correlation, the command's id as
causation, and an id derived from the command's id, so that answering a redelivered command
rebuilds a recognisably identical reply. The rules make every command idempotent:

* `NodeMaintenanceRequested`: claim; claimed -> list the VMs (only now, so that nothing can
  land on the node after the list was taken) -> `NodeMaintenanceEntered(vms, prior_status)`.
  The same holder claiming again is claimed again (the cloud's compare-and-set allows it) and
  gets `Entered` again with the status saved at the first claim; refused ->
  `NodeMaintenanceRefused(reason, current_holder)`.
* `VmMigrationRequested`: look where the VM is. Not on the source any more -> `VmMigrated`
  (again, for a duplicate: idempotent by state); a migration from or toward the source under
  way -> wait for it, look again; idle on the source -> migrate (to the named destination, or
  where the cloud places it outside `avoid_destinations`), look again; refused, or started and
  failed, and still idle on the source -> `VmMigrationFailed(reason, destination_node_id)`,
  naming the destination that was tried (None when the cloud could choose none), so that the
  sender's retry can avoid it. Unknown VM -> `VmMigrationFailed`.
* `NodeMaintenanceExitRequested`: release by the holder -> `NodeMaintenanceExited(restored)`;
  nobody holds it (released already) -> `Exited` again; another holder has it ->
  `NodeMaintenanceRefused(reason, current_holder)` answering the exit command.
* `VmListRequested` -> `VmListReported`.

The inventory (`NodeInventoryReported` on the compacted CLOUD_INVENTORY, one record per node)
is built here too: `inventory_record` turns one node of the backend's listing into its record,
`inventory_to_publish` picks the nodes whose content changed since they were last published,
and `nodes_changed_by` names the nodes a reply says were changed (so that they are published
again at once).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.envelope import Event, command_id
from schemas.events import (
    NodeInventoryReported,
    NodeMaintenanceEntered,
    NodeMaintenanceExited,
    NodeMaintenanceExitRequested,
    NodeMaintenanceRefused,
    NodeMaintenanceRequested,
    VmListReported,
    VmListRequested,
    VmMigrated,
    VmMigrationFailed,
    VmMigrationRequested,
)
from schemas.types import VmOnNode

# How often a migration command may look, wait and look again before giving up: a VM that
# keeps moving under us is a fight with another actor that this command should not win.
MAX_MIGRATION_ROUNDS = 5


@dataclass(frozen=True)
class ReplyContext:
    producer: str
    now: datetime


# --- what the cloud answered ---------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    prior_status: str


@dataclass(frozen=True)
class ClaimRefused:
    reason: str
    current_holder: str | None = None


@dataclass(frozen=True)
class Released:
    restored_status: str


@dataclass(frozen=True)
class ReleaseRefused:
    reason: str
    current_holder: str | None = None


@dataclass(frozen=True)
class VmLocation:
    """Where a VM runs, and where it is migrating to if it is."""

    vm_id: str
    node_id: str
    migrating_to: str | None = None


@dataclass(frozen=True)
class NodeInventory:
    """One compute node as the backend lists it: capacity, failure domain, whether it takes
    new VMs, who holds it, and its VMs followed by migrations under way toward it
    (`incoming=True`). Equal values mean nothing to publish again."""

    node_id: str
    failure_domain: str
    vcpus: int
    ram_mb: int
    in_maintenance: bool  # takes no new VM: held for maintenance, or its service is disabled
    maintenance_holder: str | None
    vms: tuple[VmOnNode, ...]


# --- next steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    event: Event


@dataclass(frozen=True)
class ListVms:
    node_id: str
    prior_status: str


@dataclass(frozen=True)
class WaitForMigration:
    vm_id: str


@dataclass(frozen=True)
class StartMigration:
    vm_id: str
    source: str
    destination: str | None
    avoid: tuple[str, ...] = ()  # never placed on these (when no destination is named)


MigrationStep = Reply | WaitForMigration | StartMigration


# --- maintenance ---------------------------------------------------------------------------


def after_claim(
    cmd: NodeMaintenanceRequested, answer: Claimed | ClaimRefused, ctx: ReplyContext
) -> ListVms | Reply:
    match answer:
        case Claimed():
            return ListVms(node_id=cmd.node_id, prior_status=answer.prior_status)
        case ClaimRefused():
            return Reply(
                NodeMaintenanceRefused(
                    **_envelope(cmd, ctx, "refused"),
                    node_id=cmd.node_id,
                    reason=answer.reason,
                    current_holder=answer.current_holder,
                )
            )
    raise TypeError(f"unexpected answer {answer!r}")  # pragma: no cover


def maintenance_entered(
    cmd: NodeMaintenanceRequested,
    listed: ListVms,
    vms: tuple[VmOnNode, ...] | list[VmOnNode],
    ctx: ReplyContext,
) -> Reply:
    return Reply(
        NodeMaintenanceEntered(
            **_envelope(cmd, ctx, "entered"),
            node_id=cmd.node_id,
            vms=tuple(vms),
            prior_status=listed.prior_status,
        )
    )


def after_release(
    cmd: NodeMaintenanceExitRequested, answer: Released | ReleaseRefused, ctx: ReplyContext
) -> Reply:
    match answer:
        case Released():
            return Reply(
                NodeMaintenanceExited(
                    **_envelope(cmd, ctx, "exited"),
                    node_id=cmd.node_id,
                    restored_status=answer.restored_status,
                )
            )
        case ReleaseRefused():
            return Reply(
                NodeMaintenanceRefused(
                    **_envelope(cmd, ctx, "exit-refused"),
                    node_id=cmd.node_id,
                    reason=f"release refused: {answer.reason}",
                    current_holder=answer.current_holder,
                )
            )
    raise TypeError(f"unexpected answer {answer!r}")  # pragma: no cover


def vm_list_reported(
    cmd: VmListRequested, vms: tuple[VmOnNode, ...] | list[VmOnNode], ctx: ReplyContext
) -> Reply:
    return Reply(
        VmListReported(**_envelope(cmd, ctx, "listed"), node_id=cmd.node_id, vms=tuple(vms))
    )


# --- migration -----------------------------------------------------------------------------


def next_migration_step(
    cmd: VmMigrationRequested,
    location: VmLocation | None,
    ctx: ReplyContext,
    *,
    refused: str | None = None,
    refused_destination: str | None = None,
    rounds: int = 0,
) -> MigrationStep:
    """What to do given where the VM is now.

    The adapter looks again after every wait and every migration it started (finished or
    refused), so the reply always reflects where the VM ended up. `refused` is the cloud's
    reason for refusing our last migration (or for its failure after it started), and
    `refused_destination` the destination it concerned (None if the cloud chose none);
    `rounds` counts the waits and migrations so far.
    """
    source = cmd.node_id
    if location is None:
        return _migration_failed(cmd, ctx, f"VM {cmd.vm_id} does not exist")
    if location.migrating_to is not None and source in (location.node_id, location.migrating_to):
        if rounds >= MAX_MIGRATION_ROUNDS:
            return _migration_failed(
                cmd, ctx, f"VM {cmd.vm_id} still migrating after {rounds} waits"
            )
        # Ours from an earlier attempt (it will leave), or one toward the source that began
        # before the claim (it will land, then must leave): either way, let it end first.
        return WaitForMigration(vm_id=cmd.vm_id)
    if location.node_id != source:
        return migration_done(cmd, location.node_id, ctx)
    if refused is not None:
        return _migration_failed(cmd, ctx, refused, refused_destination)
    if rounds >= MAX_MIGRATION_ROUNDS:
        return _migration_failed(
            cmd, ctx, f"VM {cmd.vm_id} still on {source} after {rounds} rounds"
        )
    return StartMigration(
        vm_id=cmd.vm_id,
        source=source,
        destination=cmd.destination_node_id,
        avoid=tuple(cmd.avoid_destinations),
    )


def migration_done(cmd: VmMigrationRequested, destination: str, ctx: ReplyContext) -> Reply:
    return Reply(
        VmMigrated(
            **_envelope(cmd, ctx, "migrated"),
            vm_id=cmd.vm_id,
            node_id=cmd.node_id,
            destination_node_id=destination,
        )
    )


def _migration_failed(
    cmd: VmMigrationRequested, ctx: ReplyContext, reason: str, destination: str | None = None
) -> Reply:
    return Reply(
        VmMigrationFailed(
            **_envelope(cmd, ctx, "migration-failed"),
            vm_id=cmd.vm_id,
            node_id=cmd.node_id,
            reason=reason,
            destination_node_id=destination,
        )
    )


# --- inventory -----------------------------------------------------------------------------


def inventory_record(node: NodeInventory, ctx: ReplyContext) -> NodeInventoryReported:
    """The record of one node on CLOUD_INVENTORY (a fact of no campaign)."""
    return NodeInventoryReported(
        campaign_id=None,
        producer=ctx.producer,
        occurred_at=ctx.now,
        node_id=node.node_id,
        failure_domain=node.failure_domain,
        vcpus=node.vcpus,
        ram_mb=node.ram_mb,
        in_maintenance=node.in_maintenance,
        maintenance_holder=node.maintenance_holder,
        vms=node.vms,
    )


def inventory_to_publish(
    listing: Iterable[NodeInventory],
    published: Mapping[str, NodeInventory],
    *,
    full: bool = False,
) -> list[NodeInventory]:
    """The nodes of `listing` to publish: those never published or whose content differs from
    what was (every one when `full`), in listing order."""
    if full:
        return list(listing)
    return [node for node in listing if published.get(node.node_id) != node]


def nodes_changed_by(reply: Event) -> tuple[str, ...]:
    """Nodes whose inventory the reply says changed: the node entering or leaving maintenance,
    the source and destination of a migration."""
    match reply:
        case NodeMaintenanceEntered() | NodeMaintenanceExited():
            return (reply.node_id,)
        case VmMigrated():
            return (reply.node_id, reply.destination_node_id)
    return ()


# --- envelope ------------------------------------------------------------------------------


def reply_id(cmd: Event, kind: str) -> uuid.UUID:
    return command_id("cloud-manager", cmd.event_id, kind)


def _envelope(cmd: Event, ctx: ReplyContext, kind: str) -> dict[str, Any]:
    return cmd.caused(event_id=reply_id(cmd, kind), producer=ctx.producer, occurred_at=ctx.now)
