"""Broken: leaves an active member's business to the VIM instead of switching over."""

from toy import ToyVnfm, run


class NeverSwitchesOver(ToyVnfm):
    def outcome_for(self, kind: str) -> str:
        return "left_for_vim" if kind == "switch_over" else super().outcome_for(kind)


if __name__ == "__main__":
    run(NeverSwitchesOver)
