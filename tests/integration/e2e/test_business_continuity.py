"""Zero business interruptions, judged by the simulated cloud's own service monitor, and the two
negative controls that prove the monitor (and so the zero) means something.

- A full campaign over a demo-like world (6 nodes, 3 failure domains, active-standby and
  load-balanced VNFs and loose VMs): every node at the target version, the same VM ids, no node
  left in maintenance, every node rebooted once, zero interruptions.
- Reference VNFMs with `--ack-without-acting` claim every switch-over and drain without doing it:
  the monitor must see active or loaded members go down.
- An Upgrade Manager with the skip-migrations negative control never migrates: on a world with
  VMs that belong to no VNF (only the VIM can move those), the monitor sees them go down.
"""

from __future__ import annotations

import pytest
from e2e_harness import (
    REFERENCE_VNFM,
    TARGET,
    UPGRADE_MANAGER,
    E2EDeployment,
    assert_clean_finish,
    of_type,
)

pytestmark = [pytest.mark.integration, pytest.mark.real_kafka, pytest.mark.timeout(240)]

# 4 nodes, 2 domains: loose VMs (no VNF) on every node, and active-standby pairs.
BROKEN_SEED = 17


async def test_full_campaign_has_zero_interruptions(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(nodes=6, domains=3, seed=0, speed=20)
    before = await d.prepare()
    kinds = {v.redundancy for v in before.vnfs}
    assert kinds == {"active_standby", "load_balanced"}, kinds
    assert any(vm.vnf_id is None for vm in before.vms), "no loose VM in this world"
    view = await d.run_campaign(campaign_id)
    after = await d.snapshot()
    assert_clean_finish(view, before, after, context=d.logs())
    counts = view.to_json()["nodes"]
    assert counts["upgraded"] == counts["total"] == 6
    # The monitor was watching: it knows every VNF, and they are all serving again.
    assert {v.id for v in after.vnfs} == {v.id for v in before.vnfs}
    for vnf in after.vnfs:
        assert len(vnf.members_in_service) >= vnf.min_in_service, vnf
    assert {n.installed_version for n in after.nodes} == {TARGET}


async def test_vnfm_acking_without_acting_is_caught(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(
        nodes=4, seed=BROKEN_SEED, extra_args={REFERENCE_VNFM: ["--ack-without-acting"]}
    )
    await d.prepare()
    view = await d.run_campaign(campaign_id)
    after = await d.snapshot()
    # Escalator believes the VNFM, so the campaign itself completes...
    assert view.state == "completed", f"{view.state}: {view.reason}\n{d.logs()}"
    # ...but the world's monitor saw business go down with the nodes.
    kinds = {i.kind for i in after.interruptions}
    assert after.interruptions, f"no interruption seen\n{d.logs()}"
    assert kinds & {"active_member_down", "loaded_member_down", "no_active_member"}, kinds
    events = await d.campaign_events(campaign_id)
    claimed = {
        o.vm_id
        for e in of_type(events, "VnfBusinessMoved")
        for o in e.outcomes  # type: ignore[attr-defined]
        if o.outcome.business_moved
    }
    hit = {m for i in after.interruptions for m in i.members}
    assert hit & claimed, f"interrupted {hit}, claimed moved {claimed}"


async def test_manager_skipping_migrations_is_caught(deploy, campaign_id: str) -> None:
    d: E2EDeployment = deploy(
        nodes=4,
        seed=BROKEN_SEED,
        extra_env={
            UPGRADE_MANAGER: {"ESCALATOR_UPGRADE_MANAGER_NEGATIVE_CONTROL_SKIP_MIGRATIONS": "true"}
        },
    )
    before = await d.prepare()
    loose = {vm.id for vm in before.vms if vm.vnf_id is None}
    assert loose, f"seed {BROKEN_SEED} must have VMs without a VNF"
    view = await d.run_campaign(campaign_id)
    after = await d.snapshot()
    assert view.state == "completed", f"{view.state}: {view.reason}\n{d.logs()}"
    unmanaged = [i for i in after.interruptions if i.kind == "unmanaged_vm_down"]
    assert unmanaged, f"interruptions: {after.interruptions}\n{d.logs()}"
    assert {m for i in unmanaged for m in i.members} <= loose
    # The broken manager claimed migrations that the cloud never saw.
    events = await d.campaign_events(campaign_id)
    assert not of_type(events, "VmMigrationRequested"), "skip-migrations still asked the cloud"
    assert {vm.id: vm.node_id for vm in after.vms} == {vm.id: vm.node_id for vm in before.vms}


async def test_parallel_campaign_keeps_vnf_constraints(deploy, campaign_id: str) -> None:
    """With --max-parallel 2, nodes carrying members of one active-standby pair are in
    maintenance together; the VNFM adapter holds the second notice until the first node is
    back (the VNF's max_unavailable), so the business is never switched onto a node about to
    reboot."""
    d: E2EDeployment = deploy(nodes=4, seed=BROKEN_SEED, max_parallel=2)
    before = await d.prepare()
    view = await d.run_campaign(campaign_id)
    after = await d.snapshot()
    assert_clean_finish(view, before, after, context=d.logs())
