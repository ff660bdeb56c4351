"""Unit tests of the scenario generator at every size, saved scenarios, the world's CLI and the
checked-in benchmark scenarios."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

import pytest

from escalator.world.app import build_parser, main, world_from_args
from escalator.world.engine import PlacementIndex, WorldEngine, plan_evacuation
from escalator.world.model import Timings, WorldState
from escalator.world.scenario import (
    EXACT_CHECK_MAX_NODES,
    LEGACY_MAX_NODES,
    every_node_evacuable,
    generate,
    load_state,
    node_size_for,
    roomy_nodes_suffice,
    save_state,
    with_timings,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "bench" / "scenarios"


def digest(state: WorldState) -> str:
    return hashlib.sha256(
        json.dumps(state.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()


def free_fraction(state: WorldState) -> tuple[float, float]:
    index = PlacementIndex.of(state)
    free = [index.free(n) for n in state.nodes.values()]
    total = (
        sum(n.vcpus for n in state.nodes.values()),
        sum(n.ram_mb for n in state.nodes.values()),
    )
    return sum(f[0] for f in free) / total[0], sum(f[1] for f in free) / total[1]


def vms_per_node(state: WorldState) -> dict[str, int]:
    count = dict.fromkeys(state.nodes, 0)
    for vm in state.vms.values():
        count[vm.node_id] += 1
    return count


# --- the default filler is the original one -------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "domains", "seed", "expected"),
    [
        # digests of what the generator made before it learnt to scale
        (12, 3, 0, "accbc9f186a9d9daf5be43377555e45548e47bf005c391d9c3a0ea3350242add"),
        (12, 3, 1, "cde6934bca1beb0612af9ce4d899c36666071e40735e37b8ca3fcd752aaf074d"),
        (6, 2, 1, "fd60be4394b3b1e6456f81ad1e7acbe0e9bb4d0025a9729e5dd633df6d0c3710"),
        (20, 3, 2, "62ae24f6e680f67a96158cdb52745d7b70eb6dcd4f6d35d4d9ef72f76fa950e2"),
        (30, 3, 7, "1f6970efa2e02adbfe0815580a677c8757e7019bc802522becfa9ce076e26403"),
    ],
)
def test_default_clouds_are_the_ones_made_before(
    nodes: int, domains: int, seed: int, expected: str
) -> None:
    assert digest(generate(nodes=nodes, failure_domains=domains, seed=seed)) == expected


# --- spare_fraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "spare"), [(12, 0.10), (40, 0.25), (100, 0.15), (150, 0.05)])
def test_spare_fraction_is_kept_and_every_node_can_be_evacuated(nodes: int, spare: float) -> None:
    state = generate(nodes=nodes, failure_domains=3, seed=5, spare_fraction=spare)
    free_vcpus, free_ram = free_fraction(state)
    assert spare <= free_vcpus <= spare + 0.06
    assert spare <= free_ram <= spare + 0.06
    assert every_node_evacuable(state)
    kinds = {v.redundancy for v in state.vnfs.values()}
    assert kinds == {"active_standby", "load_balanced"}
    for vnf in state.vnfs.values():
        hosts = [state.vms[m].node_id for m in vnf.members]
        assert len(set(hosts)) == len(hosts)
        if vnf.redundancy == "active_standby":
            assert len({state.nodes[h].failure_domain for h in hosts}) == 2


def test_spare_fraction_is_deterministic_per_seed() -> None:
    def make(seed: int) -> WorldState:
        return generate(nodes=30, failure_domains=3, seed=seed, spare_fraction=0.2)

    assert make(3) == make(3)
    assert make(3) != make(4)


def test_more_spare_means_fewer_vms() -> None:
    counts = [len(generate(nodes=24, seed=1, spare_fraction=f).vms) for f in (0.05, 0.2, 0.4, 0.8)]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0


def test_bad_parameters_are_refused() -> None:
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="spare_fraction"):
            generate(nodes=4, spare_fraction=bad)
    with pytest.raises(ValueError, match="vms_per_node"):
        generate(nodes=4, vms_per_node=0)
    with pytest.raises(ValueError, match="flavors"):
        generate(nodes=4, flavors=[])


# --- the sufficient evacuation check --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_enough_roomy_nodes_imply_every_node_can_be_evacuated(seed: int) -> None:
    # Fill to several levels (the scalable filler with the exact fallback keeps every cloud
    # evacuable); wherever the cheap condition holds, the exact plan must succeed.
    for spare in (0.02, 0.08, 0.15, 0.3):
        state = generate(nodes=30, failure_domains=3, seed=seed, spare_fraction=spare)
        engine = WorldEngine(state, clock=lambda: 0.0)
        engine.claim_maintenance("node-03", "um")  # a node taking no VMs counts as not roomy
        if roomy_nodes_suffice(state):
            index = PlacementIndex.of(state)
            assert all(plan_evacuation(state, n, index) is not None for n in state.nodes)


# --- at scale -------------------------------------------------------------------------------------


def test_node_size_for_a_number_of_vms_per_node() -> None:
    assert node_size_for(20, 0.15) == (72, 147456)
    assert node_size_for(10) == (32, 65536)  # 10 VMs of 3 vcpus on average, rounded up to 4s
    state = generate(nodes=300, seed=2, vms_per_node=20, spare_fraction=0.15)
    node = state.nodes["node-001"]
    assert (node.vcpus, node.ram_mb) == (72, 147456)
    assert 19.0 <= len(state.vms) / len(state.nodes) <= 21.5


def test_big_clouds_fill_fast_without_the_exact_check() -> None:
    nodes = 2000
    assert nodes > max(LEGACY_MAX_NODES, EXACT_CHECK_MAX_NODES)
    started = time.monotonic()
    state = generate(nodes=nodes, failure_domains=3, seed=9, vms_per_node=20, spare_fraction=0.1)
    assert time.monotonic() - started < 20  # about 1 s on a laptop
    assert 19 * nodes <= len(state.vms) <= 23 * nodes
    assert 0.1 <= free_fraction(state)[0] <= 0.12
    assert roomy_nodes_suffice(state)  # so every node can be evacuated
    counts = vms_per_node(state).values()
    assert max(counts) - min(counts) <= 12  # spread, not stacked
    # without a spare fraction: about one node's worth, as for small clouds
    dense = generate(nodes=500, failure_domains=3, seed=9)
    index = PlacementIndex.of(dense)
    assert sum(index.free(n)[0] for n in dense.nodes.values()) <= 0.08 * 32 * 500
    assert roomy_nodes_suffice(dense)


@pytest.mark.slow
def test_ten_thousand_nodes_and_two_hundred_thousand_vms() -> None:
    started = time.monotonic()
    state = generate(nodes=10_000, failure_domains=3, seed=1, vms_per_node=20, spare_fraction=0.15)
    generated_s = time.monotonic() - started
    assert generated_s < 120
    assert 190_000 <= len(state.vms) <= 215_000
    assert roomy_nodes_suffice(state)
    engine = WorldEngine(state)
    started = time.monotonic()
    payload = json.loads(engine.inventory_json())
    assert time.monotonic() - started < 10
    assert len(payload["nodes"]) == 10_000
    assert sum(len(n["vms"]) for n in payload["nodes"]) == len(state.vms)
    # per-node operations do not walk every VM
    started = time.monotonic()
    for i in range(1, 51):
        node_id = f"node-{i:05d}"
        engine.claim_maintenance(node_id, "um")
        vm_id = engine.list_vms(node_id)[0].id
        engine.migrate_vm(vm_id)
        engine.inventory_json([node_id])
        engine.node(node_id)
    per_node_s = (time.monotonic() - started) / 50
    assert per_node_s < 0.2  # a few ms each; a walk over 200,000 VMs would be far more


# --- saving and loading ---------------------------------------------------------------------------


def test_a_saved_world_loads_equal_and_saves_to_the_same_bytes(tmp_path: Path) -> None:
    state = generate(nodes=8, failure_domains=2, seed=4, spare_fraction=0.2)
    engine = WorldEngine(state, clock=lambda: 100.0)
    engine.claim_maintenance("node-1", "um")
    engine.migrate_vm(engine.list_vms("node-1")[0].id)
    engine.reboot_node("node-2", duration_s=10.0)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    save_state(state, first)
    loaded = load_state(first)
    assert loaded == state
    save_state(loaded, second)
    assert first.read_bytes() == second.read_bytes()
    assert "timings" in json.loads(first.read_text())


def test_loading_garbage_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_state(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": {"n1": {"id": "n1"}}}')
    with pytest.raises(ValueError, match="not a world scenario"):
        load_state(bad)


def test_timings_can_be_overridden_down_to_zero() -> None:
    state = generate(nodes=6, seed=1)
    same = with_timings(state, migration_s=None)
    assert same is state
    fast = with_timings(state, migration_s=0, reboot_s=0.0, resync_s=0)
    assert fast.timings == Timings(migration_s=0, reboot_s=0, resync_s=0)
    assert state.timings == Timings()  # the original is left alone
    for vnf in fast.vnfs.values():
        if vnf.redundancy == "active_standby":
            assert vnf.min_recovery_s == 0
    # zero-duration steps complete within the call that starts them
    engine = WorldEngine(fast, clock=lambda: 50.0)
    vm = engine.list_vms("node-1")[0].id
    moved = engine.migrate_vm(vm)
    assert moved.status == "active" and moved.node_id != "node-1"
    record = engine.reboot_node("node-1")
    assert record.finishes_at == record.started_at
    assert engine.node("node-1").power == "up"


# --- the command line -----------------------------------------------------------------------------


def args(*argv: str) -> WorldState:
    return world_from_args(build_parser().parse_args(list(argv)))


def test_cli_generates_loads_and_overrides_timings(tmp_path: Path) -> None:
    default = args()
    assert default == generate()
    assert args("--nodes", "6", "--seed", "1") == generate(nodes=6, seed=1)
    spare = args("--nodes", "20", "--spare-fraction", "0.2", "--vms-per-node", "12")
    assert spare == generate(nodes=20, spare_fraction=0.2, vms_per_node=12)
    path = tmp_path / "w.json"
    assert main(["--nodes", "6", "--seed", "1", "--save", str(path)]) == 0
    assert load_state(path) == generate(nodes=6, seed=1)
    assert args("--scenario", str(path)) == generate(nodes=6, seed=1)
    quick = args("--scenario", str(path), "--migration-s", "0", "--reboot-s", "0")
    assert quick.timings == Timings(migration_s=0, reboot_s=0, resync_s=2.0)
    generated_quick = args("--nodes", "6", "--resync-s", "0")
    assert generated_quick.timings.resync_s == 0


def test_cli_refuses_what_does_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.json"
    save_state(generate(nodes=4), path)
    assert main(["--scenario", str(path), "--nodes", "5"]) == 2
    assert "--nodes cannot be combined with --scenario" in capsys.readouterr().err
    assert main(["--scenario", str(tmp_path / "nope.json")]) == 2
    assert "cannot read scenario" in capsys.readouterr().err
    assert main(["--reboot-s", "-1"]) == 2
    assert "--reboot-s must be >= 0" in capsys.readouterr().err
    assert main(["--nodes", "4", "--spare-fraction", "1"]) == 2


# --- the checked-in benchmark scenarios -----------------------------------------------------------


def make_standard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_standard", SCENARIOS / "make_standard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_the_scenarios_gives_the_checked_in_files(tmp_path: Path) -> None:
    module = make_standard()
    assert module.main(["--out", str(tmp_path)]) == 0
    for name in ("standard.json", "tight.json"):
        assert (tmp_path / name).read_bytes() == (SCENARIOS / name).read_bytes(), name
    assert module.main(["--check"]) == 0


def test_the_standard_scenario() -> None:
    state = load_state(SCENARIOS / "standard.json")
    assert len(state.nodes) == 100
    assert {n.failure_domain for n in state.nodes.values()} == {"fd-1", "fd-2", "fd-3"}
    assert state.timings == Timings(migration_s=20.0, reboot_s=240.0, resync_s=30.0)
    kinds = [v.redundancy for v in state.vnfs.values()]
    assert kinds.count("active_standby") > 50 and kinds.count("load_balanced") > 50
    assert any(vm.vnf_id is None for vm in state.vms.values())
    free_vcpus, free_ram = free_fraction(state)
    assert 0.15 <= free_vcpus < 0.18 and 0.15 <= free_ram < 0.18
    assert every_node_evacuable(state)


def test_the_tight_scenario_lets_nodes_go_one_at_a_time_only() -> None:
    state = load_state(SCENARIOS / "tight.json")
    assert len(state.nodes) == 12
    assert every_node_evacuable(state)
    assert not make_standard().pair_evacuable(state)
