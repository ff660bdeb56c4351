"""The VNF registry: each service's read view of the compacted `escalator.vnf.registry.v1` topic.

The topic is the single source of VNF constraints. A record is a `VnfRegistered` event keyed by
VNF id; a tombstone (null value) removes the VNF. Because the topic is compacted, reading it from
the beginning to its high watermark gives the current registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from escalator.bus.publisher import EventPublisher
from escalator.bus.readback import read_to_high_watermark
from escalator.settings import KafkaSettings
from schemas.events import VnfProfile, VnfRegistered
from schemas.topics import VNF_REGISTRY
from schemas.types import VmId, VnfId


@dataclass
class VnfRegistry:
    """The current profiles, with a VM -> VNF index. Pure: applying records does no I/O."""

    profiles: dict[VnfId, VnfProfile] = field(default_factory=dict)
    _vnf_of_vm: dict[VmId, VnfId] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, profiles: Iterable[VnfProfile]) -> VnfRegistry:
        registry = cls()
        for profile in profiles:
            registry.put(profile)
        return registry

    def put(self, profile: VnfProfile) -> None:
        self.remove(profile.vnf_id)
        self.profiles[profile.vnf_id] = profile
        for vm_id in profile.members:
            self._vnf_of_vm[vm_id] = profile.vnf_id

    def remove(self, vnf_id: VnfId) -> None:
        old = self.profiles.pop(vnf_id, None)
        if old is not None:
            for vm_id in old.members:
                if self._vnf_of_vm.get(vm_id) == vnf_id:
                    del self._vnf_of_vm[vm_id]

    def apply(self, key: bytes, value: VnfRegistered | None) -> None:
        """Apply one topic record; `None` is a tombstone."""
        if value is None:
            self.remove(key.decode(errors="replace"))
        else:
            self.put(value.vnf)

    def get(self, vnf_id: VnfId) -> VnfProfile | None:
        return self.profiles.get(vnf_id)

    def vnf_of(self, vm_id: VmId) -> VnfProfile | None:
        vnf_id = self._vnf_of_vm.get(vm_id)
        return None if vnf_id is None else self.profiles.get(vnf_id)

    def by_vnfm(self) -> Mapping[str, list[VnfProfile]]:
        grouped: dict[str, list[VnfProfile]] = {}
        for profile in self.profiles.values():
            grouped.setdefault(profile.vnfm_id, []).append(profile)
        return grouped

    def __len__(self) -> int:
        return len(self.profiles)


async def load_registry(settings: KafkaSettings, *, timeout_s: float = 30.0) -> VnfRegistry:
    """The registry as it stands now: the compacted topic read to its high watermark."""
    records = await read_to_high_watermark(settings, VNF_REGISTRY, timeout_s=timeout_s)
    registry = VnfRegistry()
    for key, event in records.items():
        if isinstance(event, VnfRegistered):
            registry.apply(key, event)
    return registry


async def publish_profiles(
    publisher: EventPublisher, profiles: Iterable[VnfProfile], *, producer: str
) -> int:
    events = [VnfRegistered(vnf=profile, producer=producer) for profile in profiles]
    await publisher.publish_all(events, VNF_REGISTRY)
    return len(events)
