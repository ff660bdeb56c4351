"""Identifier and value types shared by every event of the contract."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"

CampaignId = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", min_length=3, max_length=64),
]
NodeId = Annotated[str, StringConstraints(pattern=_NAME, min_length=1, max_length=255)]
VmId = Annotated[str, StringConstraints(pattern=_NAME, min_length=1, max_length=255)]
VnfId = Annotated[str, StringConstraints(pattern=_NAME, min_length=1, max_length=255)]
VnfmId = Annotated[str, StringConstraints(pattern=_NAME, min_length=1, max_length=255)]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=64)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ValueModel(BaseModel):
    """Immutable value object; unknown fields are ignored so additive changes stay compatible."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class RedundancyModel(StrEnum):
    """How a VNF keeps its business alive while one of its members is impacted."""

    ACTIVE_STANDBY = "active_standby"
    LOAD_BALANCED = "load_balanced"


class MaintenanceAction(StrEnum):
    """What may be done with the business of a VM on a node going into maintenance."""

    SWITCH_OVER = "switch_over"
    DRAIN = "drain"
    OWN_ACTION = "own_action"
    MIGRATE = "migrate"


class BusinessOutcome(StrEnum):
    """What happened to the business of one VM after the VNFM was notified."""

    SWITCHED_OVER = "switched_over"
    DRAINED = "drained"
    OWN_ACTION = "own_action"
    LEFT_FOR_VIM = "left_for_vim"

    @property
    def business_moved(self) -> bool:
        return self is not BusinessOutcome.LEFT_FOR_VIM


class VnfmTimeoutPolicy(StrEnum):
    """What the campaign does with a node whose VNFM did not answer before the deadline."""

    MIGRATE = "migrate"
    SKIP_NODE = "skip-node"
    ABORT = "abort"


class ArtifactFile(ValueModel):
    """One file of a new version, fetched and verified by the node agent."""

    name: str = Field(
        min_length=1,
        max_length=255,
        description="File name as installed; never a local path on the operator's machine.",
        examples=["nova-compute-29.1.0.rpm"],
    )
    sha256: Sha256Hex = Field(
        description="Lower-case hex SHA-256 of the file; the agent refuses a mismatch.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(https?|s3|file|oci)://",
        description="Where the node agent fetches the file from.",
        examples=["https://repo.example.net/escalator/29.1.0/nova-compute-29.1.0.rpm"],
    )
    size_bytes: int | None = Field(
        default=None, ge=0, description="Size, when known.", examples=[48_213_504]
    )


class VersionManifest(ValueModel):
    """The new version the operator added: every file with its digest and location."""

    version: Version = Field(description="Version being rolled out.", examples=["29.1.0"])
    files: tuple[ArtifactFile, ...] = Field(
        min_length=1,
        max_length=1000,
        description="Files that make up the version.",
        examples=[
            [
                {
                    "name": "nova-compute-29.1.0.rpm",
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "uri": "https://repo.example.net/29.1.0/nova-compute-29.1.0.rpm",
                }
            ]
        ],
    )


class VmOnNode(ValueModel):
    """A VM found on a node once maintenance is in effect."""

    vm_id: VmId = Field(description="VM (server) id.", examples=["vm-0007"])
    vnf_id: VnfId | None = Field(
        default=None, description="VNF the VM is a member of, if any.", examples=["vnf-epc-1"]
    )
    vcpus: int = Field(ge=0, description="vCPUs the VM uses.", examples=[4])
    ram_mb: int = Field(ge=0, description="RAM the VM uses, in MiB.", examples=[8192])
    incoming: bool = Field(
        default=False,
        description="True for a migration under way toward this node when maintenance began.",
        examples=[False],
    )


class VmRef(ValueModel):
    """A VM and the VNF it belongs to."""

    vm_id: VmId = Field(description="VM (server) id.", examples=["vm-0007"])
    vnf_id: VnfId | None = Field(
        default=None, description="VNF the VM is a member of, if any.", examples=["vnf-epc-1"]
    )


class VmBusinessOutcome(ValueModel):
    """The outcome for one VM after the VNFM acted (or did not)."""

    vm_id: VmId = Field(description="VM (server) id.", examples=["vm-0007"])
    vnf_id: VnfId | None = Field(
        default=None, description="VNF the VM is a member of, if any.", examples=["vnf-epc-1"]
    )
    outcome: BusinessOutcome = Field(
        description="Whether the business moved, and how; left_for_vim means migrate it.",
        examples=[BusinessOutcome.SWITCHED_OVER],
    )


class AffectedVnf(ValueModel):
    """One VNF touched by a maintenance notice, with its VMs on the node."""

    vnf_id: VnfId = Field(description="VNF id.", examples=["vnf-epc-1"])
    vm_ids: tuple[VmId, ...] = Field(
        min_length=1, description="The VNF's VMs on the node.", examples=[["vm-0007"]]
    )


class VnfmRefusal(ValueModel):
    """A VNFM that refused to move business off a node now."""

    vnfm_id: VnfmId = Field(description="The refusing VNFM.", examples=["vnfm-a"])
    vnf_ids: tuple[VnfId, ...] = Field(
        description="Its VNFs on the node.", examples=[["vnf-epc-1"]]
    )
    reason: str = Field(
        max_length=2000, description="Why, for the operator.", examples=["peak hour"]
    )
