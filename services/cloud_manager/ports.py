"""What the Cloud Manager needs from a cloud: maintenance claims, VM lists, live migration.

Shaped so that an OpenStack backend over openstacksdk fits it one call for one call:

- `claim_and_list_vms`: `compute.disable_service(service, disabled_reason=...)` on the host's
  nova-compute, with the holder recorded in the reason (Nova has no compare-and-set: check
  that the service is enabled, or already disabled with our reason, right before); then the
  calls of `list_vms`.
- `release_maintenance`: `compute.enable_service(service)`, or back to the saved reason.
- `list_vms`: `compute.servers(all_projects=True, host=node)`, plus
  `compute.migrations(dest_compute=node, status="running")` for the incoming ones.
- `migrate_vm`: `compute.live_migrate_server(server, host=destination, block_migration="auto")`,
  then poll `compute.get_server` until its status leaves MIGRATING (still on the source: it
  failed, and the migration record names the destination). Nova's scheduler has no "avoid"
  argument: with avoided nodes and no destination, the backend picks the host itself (from
  `compute.hypervisors` and the scheduler's filters) or passes a scheduler hint.
- `vm_location`, `wait_vm_settled`: `compute.get_server(id).compute_host` and its task state.
- `inventory`: `compute.hypervisors(details=True)` (vcpus, memory), `compute.services(
  binary="nova-compute")` (disabled, reason = holder), host aggregates or availability zones
  (failure domain), `compute.servers(all_projects=True)` grouped by host, and
  `compute.migrations(status="running")` for the incoming ones: a handful of list calls for the
  whole cloud, never one per node.

Refusals are typed exceptions (`CloudRefusal` subclasses), so that the service can tell "the
cloud said no" (a reply) from "the cloud is unreachable" (`CloudUnavailable`: retry).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from schemas.types import VmOnNode
from services.cloud_manager.domain import NodeInventory, VmLocation


class CloudError(Exception):
    """Base of everything a backend raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CloudUnavailable(CloudError):
    """The cloud could not be asked (network, 5xx): the same call may work later."""


class CloudRefusal(CloudError):
    """The cloud answered no; `current_holder` names who holds the node, when it matters."""

    def __init__(self, reason: str, current_holder: str | None = None) -> None:
        super().__init__(reason)
        self.current_holder = current_holder


class ClaimRefused(CloudRefusal):
    """The node is held by another holder, or an administrator disabled it."""


class ReleaseRefused(CloudRefusal):
    """Another holder has the node; only the holder may release it."""


class MigrationRefused(CloudRefusal):
    """No valid destination, the VM is down, the destination refused it, or the migration
    started and then failed (the VM is still on its source).

    `destination` names the node the refusal or failure concerns: the destination that was
    asked for, or the one the cloud chose before the migration failed; None when the cloud
    could choose none (nothing valid, or nothing valid outside the avoided nodes)."""

    def __init__(
        self,
        reason: str,
        current_holder: str | None = None,
        *,
        destination: str | None = None,
    ) -> None:
        super().__init__(reason, current_holder)
        self.destination = destination


class UnknownNode(CloudRefusal):
    """No such node."""


class CloudBackend(Protocol):
    async def claim_and_list_vms(self, node_id: str, holder: str) -> tuple[str, list[VmOnNode]]:
        """Put the node in maintenance for `holder` (compare-and-set; the same holder may claim
        again), then list its VMs as `list_vms` does: listed only once the claim holds, nothing
        can land on the node after the list. Returns the scheduling status the node had before
        the first claim, and the VMs. A cloud whose API does both in one request makes one.
        Raises `ClaimRefused` or `UnknownNode`."""
        ...

    async def release_maintenance(self, node_id: str, holder: str) -> str:
        """Take the node out of `holder`'s maintenance, restoring the prior status, which it
        returns. A node nobody holds is already released: its status is returned. Raises
        `ReleaseRefused` if another holder has it, `UnknownNode`."""
        ...

    async def list_vms(self, node_id: str) -> list[VmOnNode]:
        """VMs on the node, then migrations under way toward it (`incoming=True`)."""
        ...

    async def migrate_vm(
        self,
        vm_id: str,
        source: str,
        destination: str | None,
        avoid: Collection[str] = (),
    ) -> str:
        """Live-migrate the VM off `source` (to `destination`, or where the cloud places it,
        never on a node of `avoid`) and wait until it finished; returns the node the VM is on
        then. Raises `MigrationRefused` (with the destination tried, if any) when the cloud
        refuses, or when the migration ends with the VM still on `source`."""
        ...

    async def vm_location(self, vm_id: str) -> VmLocation | None:
        """Where the VM is and where it migrates to; None if it does not exist."""
        ...

    async def wait_vm_settled(self, vm_id: str) -> VmLocation | None:
        """Wait until the VM is not migrating; returns where it is then."""
        ...

    async def inventory(self, node_ids: Collection[str] | None = None) -> list[NodeInventory]:
        """Every compute node (or only `node_ids`), with its capacity, failure domain, whether
        it takes new VMs, holder and VMs (migrations toward it last, `incoming=True`), in a
        few calls for the whole cloud. Raises `CloudUnavailable`, or `UnknownNode` if one of
        `node_ids` does not exist."""
        ...
