"""`WorldCloudBackend`: the `CloudBackend` port over the simulated cloud's HTTP API."""

from __future__ import annotations

import asyncio
import time
from typing import NoReturn

from escalator.world.client import WorldClient, WorldError
from escalator.world.model import VmView
from schemas.types import VmOnNode
from services.cloud_manager.domain import VmLocation
from services.cloud_manager.ports import (
    ClaimRefused,
    CloudRefusal,
    CloudUnavailable,
    MigrationRefused,
    ReleaseRefused,
    UnknownNode,
)


class WorldCloudBackend:
    def __init__(
        self, world: WorldClient, *, migration_timeout_s: float = 600.0, poll_s: float = 0.05
    ) -> None:
        self._world = world
        self._migration_timeout_s = migration_timeout_s
        self._poll_s = poll_s

    async def claim_maintenance(self, node_id: str, holder: str) -> str:
        try:
            node = await self._world.claim_maintenance(node_id, holder)
        except WorldError as err:
            await self._refuse(err, node_id, ClaimRefused)
        # The world keeps the status from before the first claim; a re-claim returns it too.
        return node.saved_status.service_status if node.saved_status else node.service_status

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
        return [
            VmOnNode(
                vm_id=vm.id,
                vnf_id=vm.vnf_id,
                vcpus=vm.vcpus,
                ram_mb=vm.ram_mb,
                incoming=vm.incoming,
            )
            for vm in vms
        ]

    async def migrate_vm(self, vm_id: str, source: str, destination: str | None) -> str:
        try:
            await self._world.migrate_vm(vm_id, destination)
        except WorldError as err:
            _raise_unavailable(err)
            raise MigrationRefused(err.message) from err
        settled = await self.wait_vm_settled(vm_id)
        if settled is None:
            raise MigrationRefused(f"VM {vm_id} disappeared while migrating")
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


def _location(vm: VmView) -> VmLocation:
    return VmLocation(vm_id=vm.id, node_id=vm.node_id, migrating_to=vm.migration_target)
