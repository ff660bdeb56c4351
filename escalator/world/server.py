"""HTTP API of the simulated cloud (aiohttp, JSON, 127.0.0.1).

Every handler is synchronous with respect to the engine: it parses the request, makes exactly
one engine call, and answers. There is no `await` between a check and the change it guards, so
operations are atomic even with many concurrent clients. Refusals from the engine become
4xx with {"error": "..."}; anything unexpected becomes a 500 with the same shape and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from escalator.world.engine import WorldEngine
from escalator.world.errors import EngineError
from escalator.world.model import VnfAction, VnfActionResult, VnfView

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.02
# Actions in one batch request; a notice names a node's VMs, far fewer than this.
MAX_VNF_ACTIONS = 1000
ENGINE_KEY = web.AppKey("engine", WorldEngine)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BodyT = TypeVar("BodyT", bound=BaseModel)


# --- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "true" is not a bool and "3" is not a number; extra keys are typos.
    model_config = ConfigDict(extra="forbid", strict=True)


class MaintenanceBody(_Body):
    holder: str = Field(min_length=1)
    # answer {"node": ..., "vms": [...]}: the node's VMs listed right after the claim
    list_vms: bool = False


class AdminDisableBody(_Body):
    note: str | None = None


class RebootBody(_Body):
    duration_s: float | None = Field(default=None, ge=0)
    version: str | None = None
    fail: bool = False


class MigrateBody(_Body):
    destination: str | None = None
    # destinations that failed for this VM before: the placement never picks them
    avoid: list[str] = Field(default_factory=list)


class SwitchOverBody(_Body):
    to_member: str = Field(min_length=1)


class MemberBody(_Body):
    member: str = Field(min_length=1)


class VnfActionsBody(_Body):
    actions: list[VnfAction] = Field(min_length=1, max_length=MAX_VNF_ACTIONS)


class FaultsBody(_Body):
    node_id: str = Field(min_length=1)
    fail_next_upgrades: int = Field(ge=0)


class MigrationFaultsBody(_Body):
    node_id: str = Field(min_length=1)
    fail_next_migrations_to: int = Field(ge=0)


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def _body(request: web.Request, model: type[BodyT]) -> BodyT:
    raw = await request.text()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BadRequest(f"invalid request body: {problems}") from exc


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.json_response(_jsonable(payload), status=status)


def _jsonable(payload: Any) -> Any:
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json")
    if isinstance(payload, dict):
        return {k: _jsonable(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [_jsonable(v) for v in payload]
    return payload


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EngineError as exc:
        return _error(exc.status, exc.message)
    except BadRequest as exc:
        return _error(400, exc.message)
    except web.HTTPException as exc:
        # Routing errors (unknown path, wrong method) keep their status, with a JSON body.
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _error(500, "internal error in the world simulator")


def _engine(request: web.Request) -> WorldEngine:
    return request.app[ENGINE_KEY]


# --- handlers ---------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    engine = _engine(request)
    return _json({"status": "ok", "now": engine.now, "speed": engine.speed})


async def snapshot(request: web.Request) -> web.Response:
    return _json(_engine(request).snapshot())


async def list_nodes(request: web.Request) -> web.Response:
    return _json({"nodes": _engine(request).nodes()})


async def inventory(request: web.Request) -> web.Response:
    """Every node with its VMs (`?node=ID`, repeatable, for some nodes only), in one answer:
    `{"nodes": [...]}`, or one node per line with `?format=ndjson`."""
    wanted = request.query.getall("node", None)
    form = request.query.get("format", "json")
    if form == "ndjson":
        text = _engine(request).inventory_ndjson(wanted)
        return web.Response(text=text, content_type="application/x-ndjson")
    if form != "json":
        raise BadRequest(f"format must be json or ndjson, not {form!r}")
    text = _engine(request).inventory_json(wanted)
    return web.Response(text=text, content_type="application/json")


async def get_node(request: web.Request) -> web.Response:
    return _json(_engine(request).node(request.match_info["node_id"]))


async def node_vms(request: web.Request) -> web.Response:
    return _json({"vms": _engine(request).list_vms(request.match_info["node_id"])})


async def claim_maintenance(request: web.Request) -> web.Response:
    body = await _body(request, MaintenanceBody)
    engine, node_id = _engine(request), request.match_info["node_id"]
    node = engine.claim_maintenance(node_id, body.holder)
    if not body.list_vms:
        return _json(node)
    return _json({"node": node, "vms": engine.list_vms(node_id)})


async def release_maintenance(request: web.Request) -> web.Response:
    holder = request.query.get("holder")
    if not holder:
        raise BadRequest("query parameter 'holder' is required")
    return _json(_engine(request).release_maintenance(request.match_info["node_id"], holder))


async def admin_disable(request: web.Request) -> web.Response:
    body = await _body(request, AdminDisableBody)
    return _json(_engine(request).admin_disable(request.match_info["node_id"], body.note))


async def admin_enable(request: web.Request) -> web.Response:
    return _json(_engine(request).admin_enable(request.match_info["node_id"]))


async def reboot_node(request: web.Request) -> web.Response:
    body = await _body(request, RebootBody)
    record = _engine(request).reboot_node(
        request.match_info["node_id"], body.duration_s, body.version, body.fail
    )
    return _json(record, status=202)


async def get_vm(request: web.Request) -> web.Response:
    return _json(_engine(request).vm(request.match_info["vm_id"]))


async def migrate_vm(request: web.Request) -> web.Response:
    body = await _body(request, MigrateBody)
    vm = _engine(request).migrate_vm(request.match_info["vm_id"], body.destination, body.avoid)
    return _json(vm, status=202)


async def list_vnfs(request: web.Request) -> web.Response:
    """Every VNF, or those named by `?id=` (repeatable; unknown ids are left out)."""
    return _json({"vnfs": _engine(request).vnfs(request.query.getall("id", None))})


async def get_vnf(request: web.Request) -> web.Response:
    return _json(_engine(request).vnf(request.match_info["vnf_id"]))


async def switch_over(request: web.Request) -> web.Response:
    body = await _body(request, SwitchOverBody)
    return _json(_engine(request).switch_over(request.match_info["vnf_id"], body.to_member))


async def drain_member(request: web.Request) -> web.Response:
    body = await _body(request, MemberBody)
    return _json(_engine(request).drain_member(request.match_info["vnf_id"], body.member))


async def restore_member(request: web.Request) -> web.Response:
    body = await _body(request, MemberBody)
    return _json(_engine(request).restore_member(request.match_info["vnf_id"], body.member))


_VNF_ACTIONS: dict[str, Callable[[WorldEngine, str, str], VnfView]] = {
    "switchover": WorldEngine.switch_over,
    "drain": WorldEngine.drain_member,
    "restore": WorldEngine.restore_member,
}


async def vnf_actions(request: web.Request) -> web.Response:
    """Several VNFM actions in one request, applied in order, each on its own: a refused one
    is answered in its place ({"status", "error"}) and the others still happen, as if each had
    been its own request. A VNFM moving a node's business makes one call instead of one per
    VNF (with no `await` in between, no other request interleaves)."""
    body = await _body(request, VnfActionsBody)
    engine = _engine(request)
    results: list[VnfActionResult] = []
    for action in body.actions:
        try:
            view = _VNF_ACTIONS[action.action](engine, action.vnf_id, action.member)
        except EngineError as exc:
            results.append(VnfActionResult(status=exc.status, error=exc.message))
        else:
            results.append(VnfActionResult(vnf=view))
    return _json({"results": results})


async def interruptions(request: web.Request) -> web.Response:
    return _json({"interruptions": _engine(request).interruptions()})


async def inject_faults(request: web.Request) -> web.Response:
    body = await _body(request, FaultsBody)
    return _json(_engine(request).inject_faults(body.node_id, body.fail_next_upgrades))


async def inject_migration_faults(request: web.Request) -> web.Response:
    """The next N migrations toward the node fail when they would land."""
    body = await _body(request, MigrationFaultsBody)
    return _json(
        _engine(request).inject_migration_faults(body.node_id, body.fail_next_migrations_to)
    )


# --- application ------------------------------------------------------------------------------


def create_app(engine: WorldEngine, *, tick_interval_s: float = TICK_INTERVAL_S) -> web.Application:
    """The aiohttp application; while it runs, a background task ticks the engine."""
    app = web.Application(middlewares=[_errors_as_json])
    app[ENGINE_KEY] = engine
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/v1/snapshot", snapshot),
            web.get("/v1/nodes", list_nodes),
            web.get("/v1/inventory", inventory),
            web.get("/v1/nodes/{node_id}", get_node),
            web.get("/v1/nodes/{node_id}/vms", node_vms),
            web.post("/v1/nodes/{node_id}/maintenance", claim_maintenance),
            web.delete("/v1/nodes/{node_id}/maintenance", release_maintenance),
            web.post("/v1/nodes/{node_id}/admin-disable", admin_disable),
            web.post("/v1/nodes/{node_id}/admin-enable", admin_enable),
            web.post("/v1/nodes/{node_id}/reboot", reboot_node),
            web.get("/v1/vms/{vm_id}", get_vm),
            web.post("/v1/vms/{vm_id}/migrate", migrate_vm),
            web.get("/v1/vnfs", list_vnfs),
            web.get("/v1/vnfs/{vnf_id}", get_vnf),
            web.post("/v1/vnfs/actions", vnf_actions),
            web.post("/v1/vnfs/{vnf_id}/switchover", switch_over),
            web.post("/v1/vnfs/{vnf_id}/drain", drain_member),
            web.post("/v1/vnfs/{vnf_id}/restore", restore_member),
            web.get("/v1/monitor/interruptions", interruptions),
            web.post("/v1/faults", inject_faults),
            web.post("/v1/faults/migrations", inject_migration_faults),
        ]
    )

    async def ticker(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_tick_forever(engine, tick_interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(ticker)
    return app


async def _tick_forever(engine: WorldEngine, interval_s: float) -> None:
    while True:
        try:
            engine.tick()
        except Exception:
            # A bug in one tick must not stop time for everyone.
            log.exception("world tick failed")
        await asyncio.sleep(interval_s)


async def serve(
    engine: WorldEngine,
    port: int,
    *,
    host: str = "127.0.0.1",
    stop: asyncio.Event | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until `stop` is set (or forever / until cancelled), announcing the real URL."""
    runner = web.AppRunner(create_app(engine), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = _bound_port(runner.addresses, port)
        announce(f"world listening on http://{host}:{bound_port}")
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def _bound_port(addresses: Sequence[Any], requested: int) -> int:
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
