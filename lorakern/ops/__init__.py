"""Functional ops (contract, DESIGN.md §3). Each is also a ``torch.ops.lorakern.*`` operator."""

from lorakern.ops.lora import add_lora, lora_expand, lora_shrink
from lorakern.ops.mla import mla_absorbed_o, mla_absorbed_q
from lorakern.ops.moe import add_lora_moe

__all__ = ["add_lora", "lora_shrink", "lora_expand", "mla_absorbed_q", "mla_absorbed_o", "add_lora_moe"]
