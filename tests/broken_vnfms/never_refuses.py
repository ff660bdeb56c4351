"""Broken: never refuses; it switches over even when its VNF is in no state to."""

from toy import ToyVnfm, run


class NeverRefuses(ToyVnfm):
    def kind(self, notice):  # type: ignore[no-untyped-def]
        kind = super().kind(notice)
        return "switch_over" if kind == "refuse" else kind


if __name__ == "__main__":
    run(NeverRefuses)
