"""The simulated cloud ("the world"): physical truth for end-to-end tests of Escalator.

Not an Escalator service: it owns nodes, VMs and VNFs in memory, serves them over HTTP, and
keeps its own record of business interruptions.

Import what you need from the submodules (`escalator.world.client` for `WorldClient`): this
package imports nothing itself, so a node agent that only talks to the world does not load the
server, the engine and the scenario generator.
"""


def main(argv: list[str] | None = None) -> int:
    from escalator.world.app import main as app_main

    return app_main(argv)
