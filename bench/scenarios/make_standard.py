"""Regenerate the checked-in benchmark scenarios (deterministic: same bytes every run).

    python bench/scenarios/make_standard.py          # writes standard.json and tight.json here
    python bench/scenarios/make_standard.py --check  # exit 1 if a file differs from its recipe

- `standard.json`: 100 nodes (32 vcpus, 64 GiB) in 3 failure domains, active-standby pairs,
  load-balanced VNFs of 3-4 members and a few VMs of no VNF, filled until 15 % of the vcpus and
  RAM are left free; every node can be evacuated on its own. Real-world timings (migration
  20 s, reboot 240 s, resync 30 s; see STANDARD_TIMINGS); `python -m escalator.world --scenario
  ... --migration-s 0 ...` overrides them.
- `tight.json`: 12 such nodes with 10 % free: every node can be evacuated, but no two nodes at
  once (for each pair, their VMs exceed the free room on the other ten), so a planner must take
  nodes one at a time.

Serve one with `python -m escalator.world --scenario bench/scenarios/standard.json`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

from escalator.world.engine import PlacementIndex
from escalator.world.model import Timings, WorldState
from escalator.world.scenario import every_node_evacuable, generate, save_state

HERE = Path(__file__).resolve().parent
SEED = 2026

# Durations of a real compute node's upgrade, not of a toy: a live migration of a few GiB takes
# tens of seconds, a package upgrade with a reboot and the compute service's return four
# minutes, an active-standby pair's resync half a minute. The control plane's overhead is
# measured against these (bench/README.md); the live run divides them by its speed factor.
STANDARD_TIMINGS = Timings(migration_s=20.0, reboot_s=240.0, resync_s=30.0)

RECIPES: dict[str, dict[str, Any]] = {
    "standard.json": {
        "nodes": 100,
        "failure_domains": 3,
        "seed": SEED,
        "spare_fraction": 0.15,
        "timings": STANDARD_TIMINGS,
    },
    "tight.json": {"nodes": 12, "failure_domains": 3, "seed": SEED, "spare_fraction": 0.10},
}


def build(name: str) -> WorldState:
    state = generate(**RECIPES[name])
    if not every_node_evacuable(state):
        raise AssertionError(f"{name}: some node cannot be evacuated")
    if name == "tight.json" and pair_evacuable(state):
        raise AssertionError(f"{name}: two nodes can be evacuated at once; not tight")
    return state


def pair_evacuable(state: WorldState) -> bool:
    """Whether some two nodes' VMs fit, by capacity alone, in the free room of the others."""
    index = PlacementIndex.of(state)
    nodes = list(state.nodes.values())
    free = {n.id: index.free(n) for n in nodes}
    total_free = (sum(f[0] for f in free.values()), sum(f[1] for f in free.values()))
    for a, b in itertools.combinations(nodes, 2):
        load = [index.usage[a.id][d] + index.usage[b.id][d] for d in (0, 1)]
        room = [total_free[d] - free[a.id][d] - free[b.id][d] for d in (0, 1)]
        if load[0] <= room[0] and load[1] <= room[1]:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="directory (default: here)")
    args = parser.parse_args(argv)
    stale = []
    for name in RECIPES:
        path = args.out / name
        state = build(name)
        if args.check:
            scratch = path.with_suffix(".check.tmp")
            save_state(state, scratch)
            same = path.exists() and scratch.read_bytes() == path.read_bytes()
            scratch.unlink()
            if not same:
                stale.append(name)
            continue
        save_state(state, path)
        print(f"{path}: {len(state.nodes)} nodes, {len(state.vms)} VMs, {len(state.vnfs)} VNFs")
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
