"""Functional ops (contract, DESIGN.md §3). Each is also a ``torch.ops.lorakern.*`` operator."""

from lorakern.ops.lora import add_lora, lora_expand, lora_shrink

__all__ = ["add_lora", "lora_shrink", "lora_expand"]
