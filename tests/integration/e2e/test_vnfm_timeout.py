"""The VNFM timeout path end to end: reference VNFMs that never reply (`--silent`).

With `--vnfm-timeout 2 --on-vnfm-timeout migrate`, every node's notices expire; the adapter tells
each VNFM (`NoticeExpired`), reports `BusinessMoved(timed_out=true)` with every VM left for the VIM,
and only then does the Upgrade Manager ask the cloud to migrate the node's business VMs. Every
check is on event times and causation ids read back from the bus, never on wall-clock sleeps.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from e2e_harness import REFERENCE_VNFM, E2EDeployment, assert_clean_finish, for_node, of_type

from schemas.events import (
    BusinessMoved,
    BusinessMoveRequested,
    NodeMaintenanceEntered,
    NodeUpgradeRequested,
    NoticeExpired,
    VmMigrated,
    VmMigrationRequested,
    VnfMaintenanceNotified,
)
from schemas.types import BusinessOutcome

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

TIMEOUT_S = 2.0
# Upper bound of the adapter's hop from the Manager's request to the VNFM's notice.
HOP = timedelta(seconds=0.5)


async def test_silent_vnfm_times_out_then_the_vim_migrates(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(nodes=4, seed=17, extra_args={REFERENCE_VNFM: ["--silent"]})
    before = await d.prepare()
    view = await d.run_campaign(campaign_id, vnfm_timeout_s=TIMEOUT_S)
    events = await d.campaign_events(campaign_id)
    after = await d.snapshot()
    assert_clean_finish(view, before, after, context=d.logs())

    assert not of_type(events, "VnfBusinessMoved"), "a --silent VNFM replied"
    timeout = timedelta(seconds=TIMEOUT_S)
    for node_id in d.node_ids:
        ctx = f"node {node_id}; logs {d.group.log_dir}"
        mine = for_node(events, node_id)
        [entered] = [e for e in mine if isinstance(e, NodeMaintenanceEntered)]
        [request] = [e for e in mine if isinstance(e, BusinessMoveRequested)]
        # The Manager's deadline is the campaign's timeout, counted from its request.
        assert request.deadline == request.occurred_at + timeout, ctx

        notices = [e for e in mine if isinstance(e, VnfMaintenanceNotified)]
        expired = [e for e in mine if isinstance(e, NoticeExpired)]
        assert notices, ctx
        assert {x.notice_id for x in expired} == {n.notice_id for n in notices}, ctx
        by_notice = {n.notice_id: n for n in notices}
        for x in expired:
            notice = by_notice[x.notice_id]
            assert x.causation_id == notice.event_id, ctx
            assert x.vnfm_id == notice.vnfm_id, ctx
            # The VNFM gets the campaign's window, never less than the Manager's deadline: from
            # the request, or from the notice's sending if the adapter held it while a VNF of
            # the notice recovered from the previous node's impact (min_recovery_s).
            assert notice.reply_deadline >= request.deadline, ctx
            window = notice.reply_deadline - notice.occurred_at
            assert timeout - HOP <= window <= timeout, f"{ctx}: window {window}"
            assert x.occurred_at >= notice.reply_deadline, (
                f"{ctx}: expired at {x.occurred_at}, before the deadline {notice.reply_deadline}"
            )
            assert x.occurred_at >= request.occurred_at + timeout, ctx
            assert x.occurred_at - notice.occurred_at >= timeout - HOP, ctx

        [moved] = [e for e in mine if isinstance(e, BusinessMoved)]
        assert moved.timed_out is True, ctx
        # Closed by the deadline, not by a reply: the request is its cause too.
        assert moved.causation_id == moved.request_id == request.event_id, ctx
        assert moved.occurred_at >= max(x.occurred_at for x in expired), ctx
        assert moved.occurred_at >= request.deadline, ctx
        assert all(o.outcome is BusinessOutcome.LEFT_FOR_VIM for o in moved.outcomes), ctx

        # Every VM of the node, business ones included, is migrated, after the expiry.
        requested = [e for e in mine if isinstance(e, VmMigrationRequested)]
        business_vms = {vm.vm_id for vm in entered.vms if vm.vnf_id is not None}
        assert business_vms, ctx
        assert business_vms <= {r.vm_id for r in requested}, ctx
        latest_expiry = max(x.occurred_at for x in expired)
        for r in requested:
            assert r.causation_id == moved.event_id, ctx
            assert r.occurred_at >= latest_expiry, ctx
        migrated = {e.vm_id for e in mine if isinstance(e, VmMigrated)}
        assert migrated == {r.vm_id for r in requested}, ctx
        [upgrade] = [e for e in mine if isinstance(e, NodeUpgradeRequested)]
        assert upgrade.occurred_at >= latest_expiry, ctx
