"""`WorldCloudBackend`: the `CloudBackend` port over the simulated cloud's HTTP API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection
from typing import Any, NoReturn

from escalator.world.client import WorldClient, WorldError
from escalator.world.model import VmView
from schemas.types import VmOnNode
from services.cloud_manager.domain import NodeInventory, VmLocation
from services.cloud_manager.ports import (
    ClaimRefused,
    CloudRefusal,
    CloudUnavailable,
    MigrationRefused,
    ReleaseRefused,
    UnknownNode,
)

# Inventory answers bigger than this are parsed in a worker thread, off the event loop.
PARSE_IN_THREAD_BYTES = 256 * 1024

VmKey = tuple[str, str | None, int, int, bool]


class WorldCloudBackend:
    def __init__(
        self, world: WorldClient, *, migration_timeout_s: float = 600.0, poll_s: float = 0.05
    ) -> None:
        self._world = world
        self._migration_timeout_s = migration_timeout_s
        self._poll_s = poll_s
        self._vm_cache: dict[VmKey, VmOnNode] = {}

    async def inventory(self, node_ids: Collection[str] | None = None) -> list[NodeInventory]:
        """One `GET /v1/inventory` for every node (or the given ones)."""
        try:
            raw = await self._world.inventory_ndjson(node_ids)
        except WorldError as err:
            _raise_unavailable(err)
            if err.status == 404:
                raise UnknownNode(err.message) from err
            raise CloudUnavailable(f"{err.status}: {err.message}") from err
        complete = node_ids is None
        try:
            if len(raw) > PARSE_IN_THREAD_BYTES:
                return await asyncio.to_thread(self._parse, raw, complete)
            return self._parse(raw, complete)
        except (ValueError, KeyError, TypeError) as exc:
            raise CloudUnavailable(f"unreadable inventory from the world: {exc!r:.200}") from exc

    def _parse(self, raw: bytes, complete: bool) -> list[NodeInventory]:
        """The world's inventory (one node per line) as `NodeInventory`s, parsed line by line
        so that a thread doing it lets the event loop run in between. Equal VMs are shared
        between calls (at 200,000 VMs, building every `VmOnNode` anew would cost most of the
        work, and shared instances make comparing with the last published inventory a matter
        of identity)."""
        cache = self._vm_cache
        fresh: dict[VmKey, VmOnNode] = {} if complete else cache
        listing = [
            _node_inventory(json.loads(line), cache, fresh)
            for line in raw.splitlines()
            if line.strip()
        ]
        if complete:
            self._vm_cache = fresh  # forget VMs that are gone or changed
        return listing

    async def claim_and_list_vms(self, node_id: str, holder: str) -> tuple[str, list[VmOnNode]]:
        """One request: the world claims, then lists, in the same turn."""
        try:
            node, vms = await self._world.claim_maintenance_listing_vms(node_id, holder)
        except WorldError as err:
            await self._refuse(err, node_id, ClaimRefused)
        # The world keeps the status from before the first claim; a re-claim returns it too.
        status = node.saved_status.service_status if node.saved_status else node.service_status
        return status, [_vm_on_node(vm) for vm in vms]

    async def release_maintenance(self, node_id: str, holder: str) -> str:
        try:
            node = await self._world.release_maintenance(node_id, holder)
        except WorldError as err:
            await self._refuse(err, node_id, ReleaseRefused)
        return node.service_status

    async def list_vms(self, node_id: str) -> list[VmOnNode]:
        try:
            vms = await self._world.node_vms(node_id)
        except WorldError as err:
            await self._refuse(err, node_id, UnknownNode)
        return [_vm_on_node(vm) for vm in vms]

    async def migrate_vm(
        self,
        vm_id: str,
        source: str,
        destination: str | None,
        avoid: Collection[str] = (),
    ) -> str:
        try:
            started = await self._world.migrate_vm(vm_id, destination, avoid=avoid)
        except WorldError as err:
            _raise_unavailable(err)
            # A refusal names the destination only when one was asked for: without one, the
            # world found no valid node (outside the avoided ones), so none was chosen.
            raise MigrationRefused(err.message, destination=destination) from err
        target = started.migration_target or destination
        # The answer to the request is itself a read of the VM: a migration that already
        # ended (a short one) needs no poll.
        settled = (
            _location(started)
            if started.status != "migrating"
            else await self.wait_vm_settled(vm_id)
        )
        if settled is None:
            raise MigrationRefused(f"VM {vm_id} disappeared while migrating", destination=target)
        if settled.node_id == source:
            raise MigrationRefused(
                f"migration of VM {vm_id} to {target} failed; it is still on {source}",
                destination=target,
            )
        return settled.node_id

    async def vm_location(self, vm_id: str) -> VmLocation | None:
        vm = await self._vm(vm_id)
        return None if vm is None else _location(vm)

    async def wait_vm_settled(self, vm_id: str) -> VmLocation | None:
        deadline = time.monotonic() + self._migration_timeout_s
        while True:
            vm = await self._vm(vm_id)
            if vm is None or vm.status != "migrating":
                return None if vm is None else _location(vm)
            if time.monotonic() > deadline:
                raise CloudUnavailable(
                    f"VM {vm_id} still migrating after {self._migration_timeout_s}s"
                )
            await asyncio.sleep(self._poll_s)

    async def _vm(self, vm_id: str) -> VmView | None:
        try:
            return await self._world.vm(vm_id)
        except WorldError as err:
            if err.status == 404:
                return None
            _raise_unavailable(err)
            raise CloudUnavailable(err.message) from err

    async def _refuse(self, err: WorldError, node_id: str, refusal: type[CloudRefusal]) -> NoReturn:
        _raise_unavailable(err)
        if err.status == 404:
            raise UnknownNode(f"unknown node {node_id}") from err
        if err.status != 409:
            raise CloudUnavailable(f"{err.status}: {err.message}") from err
        holder: str | None = None
        try:
            holder = (await self._world.node(node_id)).maintenance_holder
        except WorldError:
            pass  # the refusal stands without naming the holder
        raise refusal(err.message, current_holder=holder) from err


def _raise_unavailable(err: WorldError) -> None:
    if err.status == 0 or err.status >= 500:
        raise CloudUnavailable(err.message) from err


def _node_inventory(
    node: dict[str, Any], cache: dict[VmKey, VmOnNode], fresh: dict[VmKey, VmOnNode]
) -> NodeInventory:
    vms: list[VmOnNode] = []
    for vm in node["vms"]:
        key: VmKey = (vm["id"], vm["vnf_id"], vm["vcpus"], vm["ram_mb"], vm["incoming"])
        found = cache.get(key)
        if found is None:
            found = VmOnNode(
                vm_id=key[0], vnf_id=key[1], vcpus=key[2], ram_mb=key[3], incoming=key[4]
            )
        fresh[key] = found
        vms.append(found)
    holder = node["maintenance_holder"]
    return NodeInventory(
        node_id=node["id"],
        failure_domain=node["failure_domain"],
        vcpus=node["vcpus"],
        ram_mb=node["ram_mb"],
        in_maintenance=holder is not None or node["service_status"] != "enabled",
        maintenance_holder=holder,
        vms=tuple(vms),
    )


def _vm_on_node(vm: VmView) -> VmOnNode:
    return VmOnNode(
        vm_id=vm.id, vnf_id=vm.vnf_id, vcpus=vm.vcpus, ram_mb=vm.ram_mb, incoming=vm.incoming
    )


def _location(vm: VmView) -> VmLocation:
    return VmLocation(vm_id=vm.id, node_id=vm.node_id, migrating_to=vm.migration_target)
