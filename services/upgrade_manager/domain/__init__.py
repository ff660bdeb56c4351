"""The Upgrade Manager's pure decision core: `decide(state, input, ctx) -> Decision`.

No I/O, no clock, no randomness. The adapter owns persistence (per campaign: the plan, written
once; a small status record; one record per node; each written back only when `Decision` says it
changed), publishing, heartbeats and Ticks. `rebuild` reassembles a campaign from its records.
"""

from .campaign import Selection, decide, recover, select_next
from .node_cycle import BACKSTOP_GRACE
from .state import (
    IN_CYCLE_STEPS,
    AgentStatus,
    CampaignPlan,
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
    rebuild,
)

__all__ = [
    "BACKSTOP_GRACE",
    "IN_CYCLE_STEPS",
    "AgentStatus",
    "CampaignPlan",
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
    "rebuild",
    "recover",
    "select_next",
]
