"""The simulated cloud ("the world"): physical truth for end-to-end tests of Escalator.

Not an Escalator service: it owns nodes, VMs and VNFs in memory, serves them over HTTP, and
keeps its own record of business interruptions.
"""

from escalator.world.app import main, run_world
from escalator.world.client import WorldClient, WorldError
from escalator.world.engine import WorldEngine
from escalator.world.model import WorldState
from escalator.world.scenario import generate, vnf_registry_records

__all__ = [
    "WorldClient",
    "WorldEngine",
    "WorldError",
    "WorldState",
    "generate",
    "main",
    "run_world",
    "vnf_registry_records",
]
