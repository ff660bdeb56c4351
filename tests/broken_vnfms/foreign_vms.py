"""Broken: after a drain it reports every member of the VNF, not only the VMs of the notice."""

from toy import ToyVnfm, run

from schemas.types import VmBusinessOutcome


class ForeignVms(ToyVnfm):
    def outcomes(self, notice, kind):  # type: ignore[no-untyped-def]
        outcomes = super().outcomes(notice, kind)
        if kind != "drain":
            return outcomes
        extra = [
            VmBusinessOutcome(vm_id=f"{o.vm_id}-peer", vnf_id=o.vnf_id, outcome="drained")
            for o in outcomes
        ]
        return outcomes + extra


if __name__ == "__main__":
    run(ForeignVms)
