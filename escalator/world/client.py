"""Async client of the world's HTTP API, returning the world's own pydantic models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, TypeAdapter

from escalator.world.model import (
    Interruption,
    InventoryNode,
    NodeView,
    RebootRecord,
    VmView,
    VnfAction,
    VnfActionResult,
    VnfView,
    WorldSnapshot,
)

ModelT = TypeVar("ModelT", bound=BaseModel)


def _seg(identifier: str) -> str:
    """An id as one URL path segment."""
    return quote(identifier, safe="")


class WorldError(Exception):
    """The world answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class WorldClient:
    """Typed calls to the world. Use as `async with WorldClient(url) as world: ...`, or call
    `close()`; a session passed in is borrowed and left open."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __aenter__(self) -> WorldClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | list[tuple[str, str]] | None = None,
    ) -> Any:
        try:
            async with self._http().request(
                method, f"{self.base_url}{path}", json=json, params=params
            ) as response:
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = None
                if response.status >= 400:
                    message = (
                        (payload.get("error") if isinstance(payload, dict) else None)
                        or response.reason
                        or "error"
                    )
                    raise WorldError(response.status, str(message))
                return payload
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorldError(0, f"world unreachable at {self.base_url}: {exc!r}") from exc

    async def _raw(self, path: str, params: list[tuple[str, str]] | None = None) -> bytes:
        """The body of a GET, unparsed (for answers big enough that the caller parses them
        off the event loop)."""
        try:
            async with self._http().get(f"{self.base_url}{path}", params=params) as response:
                body = await response.read()
                if response.status >= 400:
                    try:
                        message = json.loads(body).get("error")
                    except (ValueError, AttributeError):
                        message = None
                    raise WorldError(response.status, str(message or response.reason or "error"))
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorldError(0, f"world unreachable at {self.base_url}: {exc!r}") from exc

    async def _model(self, model: type[ModelT], method: str, path: str, **kw: Any) -> ModelT:
        return model.model_validate(await self._request(method, path, **kw))

    async def _models(
        self, model: type[ModelT], key: str, method: str, path: str, **kw: Any
    ) -> list[ModelT]:
        payload = await self._request(method, path, **kw)
        return TypeAdapter(list[model]).validate_python(payload[key])  # type: ignore[valid-type]

    # queries -----------------------------------------------------------------------------------

    async def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/healthz")
        return result

    async def snapshot(self) -> WorldSnapshot:
        return await self._model(WorldSnapshot, "GET", "/v1/snapshot")

    async def nodes(self) -> list[NodeView]:
        return await self._models(NodeView, "nodes", "GET", "/v1/nodes")

    async def inventory(self, node_ids: Iterable[str] | None = None) -> list[InventoryNode]:
        """Every node (or these) with its VMs and the migrations under way toward it."""
        body = await self.inventory_json(node_ids)
        return TypeAdapter(list[InventoryNode]).validate_python(json.loads(body)["nodes"])

    async def inventory_json(self, node_ids: Iterable[str] | None = None) -> bytes:
        """`inventory` as the world's JSON text (`{"nodes": [...]}`), unparsed: at 10,000 nodes
        and 200,000 VMs it is some 20 MB, better parsed away from the event loop."""
        params = None if node_ids is None else [("node", n) for n in node_ids]
        if params == []:
            return b'{"nodes":[]}'
        return await self._raw("/v1/inventory", params)

    async def inventory_ndjson(self, node_ids: Iterable[str] | None = None) -> bytes:
        """`inventory` as newline-delimited JSON, one node per line, unparsed: a reader can
        parse it line by line (in a thread, without holding the interpreter for one long
        parse of some 20 MB)."""
        params = [("format", "ndjson")]
        if node_ids is not None:
            params += [("node", n) for n in node_ids]
            if len(params) == 1:
                return b""
        return await self._raw("/v1/inventory", params)

    async def node(self, node_id: str) -> NodeView:
        return await self._model(NodeView, "GET", f"/v1/nodes/{_seg(node_id)}")

    async def node_vms(self, node_id: str) -> list[VmView]:
        """VMs on the node plus migrations under way toward it (`incoming=True`)."""
        return await self._models(VmView, "vms", "GET", f"/v1/nodes/{_seg(node_id)}/vms")

    async def vm(self, vm_id: str) -> VmView:
        return await self._model(VmView, "GET", f"/v1/vms/{_seg(vm_id)}")

    async def vnfs(self, vnf_ids: Iterable[str] | None = None) -> list[VnfView]:
        """Every VNF, or those of `vnf_ids` the world knows (one request either way)."""
        if vnf_ids is None:
            return await self._models(VnfView, "vnfs", "GET", "/v1/vnfs")
        params = [("id", v) for v in vnf_ids]
        if not params:
            return []
        return await self._models(VnfView, "vnfs", "GET", "/v1/vnfs", params=params)

    async def vnf(self, vnf_id: str) -> VnfView:
        return await self._model(VnfView, "GET", f"/v1/vnfs/{_seg(vnf_id)}")

    async def interruptions(self) -> list[Interruption]:
        return await self._models(Interruption, "interruptions", "GET", "/v1/monitor/interruptions")

    # maintenance -------------------------------------------------------------------------------

    async def claim_maintenance(self, node_id: str, holder: str) -> NodeView:
        """Raises WorldError(409) when another holder has it or an administrator disabled it."""
        return await self._model(
            NodeView, "POST", f"/v1/nodes/{_seg(node_id)}/maintenance", json={"holder": holder}
        )

    async def claim_maintenance_listing_vms(
        self, node_id: str, holder: str
    ) -> tuple[NodeView, list[VmView]]:
        """`claim_maintenance`, then `node_vms`, in one request (the world lists right after the
        claim, with nothing in between). Raises like `claim_maintenance`."""
        payload = await self._request(
            "POST",
            f"/v1/nodes/{_seg(node_id)}/maintenance",
            json={"holder": holder, "list_vms": True},
        )
        node = NodeView.model_validate(payload["node"])
        return node, TypeAdapter(list[VmView]).validate_python(payload["vms"])

    async def release_maintenance(self, node_id: str, holder: str) -> NodeView:
        return await self._model(
            NodeView, "DELETE", f"/v1/nodes/{_seg(node_id)}/maintenance", params={"holder": holder}
        )

    async def admin_disable(self, node_id: str, note: str | None = None) -> NodeView:
        return await self._model(
            NodeView, "POST", f"/v1/nodes/{_seg(node_id)}/admin-disable", json={"note": note}
        )

    async def admin_enable(self, node_id: str) -> NodeView:
        return await self._model(
            NodeView, "POST", f"/v1/nodes/{_seg(node_id)}/admin-enable", json={}
        )

    # actions -----------------------------------------------------------------------------------

    async def reboot_node(
        self,
        node_id: str,
        *,
        duration_s: float | None = None,
        version: str | None = None,
        fail: bool = False,
    ) -> RebootRecord:
        body: dict[str, Any] = {"fail": fail}
        if duration_s is not None:
            body["duration_s"] = float(duration_s)
        if version is not None:
            body["version"] = version
        return await self._model(
            RebootRecord, "POST", f"/v1/nodes/{_seg(node_id)}/reboot", json=body
        )

    async def wait_reboot_finished(
        self, node_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.05
    ) -> RebootRecord:
        """Poll until the node's latest reboot is over; returns its record (succeeded/failed)."""
        node = await self.wait_reboot_over(node_id, timeout_s=timeout_s, poll_s=poll_s)
        assert node.reboot is not None
        return node.reboot

    async def wait_reboot_over(
        self, node_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.05
    ) -> NodeView:
        """Poll until the node's latest reboot is over; returns the node as the last poll read
        it (so that a caller checking the version afterwards need not read it again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            node = await self.node(node_id)
            if node.reboot is not None and node.reboot.state != "in_progress":
                return node
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} still rebooting after {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def migrate_vm(
        self, vm_id: str, destination: str | None = None, *, avoid: Iterable[str] = ()
    ) -> VmView:
        """Start a live migration (to `destination`, or where the world places it, never on a
        node of `avoid`); returns the VM migrating. Raises WorldError(409) when refused."""
        body: dict[str, Any] = {} if destination is None else {"destination": destination}
        avoided = list(avoid)
        if avoided:
            body["avoid"] = avoided
        return await self._model(VmView, "POST", f"/v1/vms/{_seg(vm_id)}/migrate", json=body)

    async def switch_over(self, vnf_id: str, to_member: str) -> VnfView:
        return await self._model(
            VnfView, "POST", f"/v1/vnfs/{_seg(vnf_id)}/switchover", json={"to_member": to_member}
        )

    async def drain_member(self, vnf_id: str, member: str) -> VnfView:
        return await self._model(
            VnfView, "POST", f"/v1/vnfs/{_seg(vnf_id)}/drain", json={"member": member}
        )

    async def vnf_actions(self, actions: Sequence[VnfAction]) -> list[VnfActionResult]:
        """Several VNFM actions in one request, applied in order, each on its own; one result
        per action, a refusal in its place. Raises WorldError only when the request as a whole
        fails (unreachable: status 0)."""
        if not actions:
            return []
        body = {"actions": [a.model_dump(mode="json") for a in actions]}
        return await self._models(VnfActionResult, "results", "POST", "/v1/vnfs/actions", json=body)

    async def restore_member(self, vnf_id: str, member: str) -> VnfView:
        return await self._model(
            VnfView, "POST", f"/v1/vnfs/{_seg(vnf_id)}/restore", json={"member": member}
        )

    async def inject_faults(self, node_id: str, fail_next_upgrades: int) -> NodeView:
        return await self._model(
            NodeView,
            "POST",
            "/v1/faults",
            json={"node_id": node_id, "fail_next_upgrades": fail_next_upgrades},
        )

    async def inject_migration_faults(self, node_id: str, fail_next_migrations_to: int) -> NodeView:
        """The next `fail_next_migrations_to` migrations toward the node fail when they would
        land (the VM stays on its source); 0 clears it."""
        return await self._model(
            NodeView,
            "POST",
            "/v1/faults/migrations",
            json={"node_id": node_id, "fail_next_migrations_to": fail_next_migrations_to},
        )
