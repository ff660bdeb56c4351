"""The planner's inputs, as every Upgrade Manager instance sees them: inventory and VNF rules.

Two compacted topics are followed whole (see `CompactedFollower`): the Cloud Manager's inventory,
one `NodeInventoryReported` per node, and the VNF registry, one `VnfRegistered` per VNF. The
`Cloud` index is updated record by record, so a planning decision never re-reads 200,000 VMs.
"""

from __future__ import annotations

import logging

from escalator.bus.follower import CompactedFollower, DeadLetterHook
from escalator.settings import KafkaSettings
from schemas.envelope import Event
from schemas.events import NodeInventoryReported, VnfRegistered
from schemas.topics import CLOUD_INVENTORY, VNF_REGISTRY
from services.upgrade_manager.domain.planner import Cloud, Host, VnfRule

log = logging.getLogger(__name__)


class CloudView:
    def __init__(self, settings: KafkaSettings, on_invalid: DeadLetterHook | None = None) -> None:
        self.cloud = Cloud()
        self.rules: dict[str, VnfRule] = {}
        self.max_recovery_s = 0.0
        self._followers = (
            CompactedFollower(
                settings, CLOUD_INVENTORY, self.apply_inventory, on_invalid=on_invalid
            ),
            CompactedFollower(settings, VNF_REGISTRY, self.apply_registry, on_invalid=on_invalid),
        )

    def apply_inventory(self, key: bytes, event: Event | None) -> None:
        if event is None:
            self.cloud.remove(key.decode(errors="replace"))
        elif isinstance(event, NodeInventoryReported):
            self.cloud.put(Host.from_report(event))

    def apply_registry(self, key: bytes, event: Event | None) -> None:
        if event is None:
            removed = self.rules.pop(key.decode(errors="replace"), None)
            if removed is not None and removed.min_recovery_s >= self.max_recovery_s:
                self.max_recovery_s = max(
                    (r.min_recovery_s for r in self.rules.values()), default=0
                )
        elif isinstance(event, VnfRegistered):
            rule = VnfRule.from_profile(event.vnf)
            self.rules[rule.vnf_id] = rule
            self.max_recovery_s = max(self.max_recovery_s, rule.min_recovery_s)

    async def start(self) -> None:
        for follower in self._followers:
            await follower.start()
        log.info(
            "cloud view: %d node(s) in the inventory, %d VNF rule(s)",
            len(self.cloud.hosts),
            len(self.rules),
        )

    async def stop(self) -> None:
        for follower in self._followers:
            await follower.stop()
