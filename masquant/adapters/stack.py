"""A stack of blocks over one residual stream, as an adapter describes it to the walker and the deploy step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn


@dataclass
class BlockStack:
    """A stack of blocks over one residual stream, as the walker and the deploy step see it."""

    name: str  # "decoder" | "vision": report keys and cache keys name it
    blocks: Sequence[nn.Module]
    exit: nn.Module  # the first module the model calls after the last block (the final norm, the exit norm)
    linears: Callable[[nn.Module], dict[str, nn.Module]]  # block -> {role: linear}, every linear of a block
    set_linear: Callable[[nn.Module, str, nn.Module], None]  # (block, role, new module)
    input_groups: Mapping[str, tuple[str, ...]]  # {group: roles sharing one input}
    routed: bool = False  # tokens carry modalities: statistics are kept per modality, linears route by modality
    masks: Callable[[dict], dict[str, torch.Tensor]] | None = None  # batch -> {modality: bool [B, T]}
    entry: nn.Module | None = None  # module whose call's keyword arguments give the between-block state
    between_state: Callable[[dict], Any] | None = None  # entry's kwargs -> state for after_block
    after_block: Callable[[int, torch.Tensor, Any], torch.Tensor] | None = None  # the model's step between blocks
    every_batch: bool = True  # every calibration batch reaches the stack (False: batches without the input skip it)
    unit: str = "layer"  # report keys: <method>/<name>/<unit>_<i>

    def __post_init__(self):
        self.role_group = {role: group for group, roles in self.input_groups.items() for role in roles}

    def input_group_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """One linear per input group (they share their input): where input statistics are observed."""
        lin = self.linears(block)
        return {group: lin[roles[0]] for group, roles in self.input_groups.items()}

    @property
    def report_prefix(self) -> str:
        """'' for the decoder, '<name>_' for any other stack (``mquant/vision_gptq_loss/block_0``)."""
        return "" if self.name == "decoder" else f"{self.name}_"
