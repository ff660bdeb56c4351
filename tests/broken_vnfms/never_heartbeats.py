"""Broken: works past the deadline without ever sending MaintenanceDeadlineExtended."""

from toy import ToyVnfm, run


class NeverHeartbeats(ToyVnfm):
    async def heartbeat(self, notice):  # type: ignore[no-untyped-def]
        return None


if __name__ == "__main__":
    run(NeverHeartbeats)
