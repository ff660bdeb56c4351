"""The Upgrade Manager's pure decision core: `decide(state, input, ctx) -> Decision`.

No I/O, no clock, no randomness. The adapter owns persistence (one record per node plus one per
campaign, written back only when `Decision` says it changed), publishing, heartbeats and Ticks.
"""

from .campaign import Selection, decide, recover, select_next
from .node_cycle import BACKSTOP_GRACE
from .state import (
    IN_CYCLE_STEPS,
    AgentStatus,
    CampaignRecord,
    CampaignState,
    CampaignStatus,
    Context,
    Decision,
    Input,
    NodeRecord,
    PendingMigration,
    Sent,
    Tick,
)

__all__ = [
    "BACKSTOP_GRACE",
    "IN_CYCLE_STEPS",
    "AgentStatus",
    "CampaignRecord",
    "CampaignState",
    "CampaignStatus",
    "Context",
    "Decision",
    "Input",
    "NodeRecord",
    "PendingMigration",
    "Selection",
    "Sent",
    "Tick",
    "decide",
    "recover",
    "select_next",
]
