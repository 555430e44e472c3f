"""Thin modules over the ops (DESIGN.md §4). :mod:`lorakern.nn.mla`: MLA attention with LoRA on every projection.
:mod:`lorakern.nn.linear`: ``LoRALinear`` / ``MergedLoRALinear`` / ``SliceGroup`` driven by a shared ``LoRAContext``.
:mod:`lorakern.nn.moe`: LoRA on fused MoE experts (gate_up before the activation, down before the weighted sum)."""

from lorakern.nn.mla import MLAAttention, MLAConfig, MLALoRA
from lorakern.nn.linear import LoRAContext, LoRALinear, MergedLoRALinear, SliceGroup
from lorakern.nn.moe import LoRAMoEExperts, MoEBlock, MoEConfig, MoELoRA, attach_moe_lora

__all__ = ["MLAAttention", "MLAConfig", "MLALoRA", "LoRAContext", "LoRALinear", "MergedLoRALinear", "SliceGroup",
           "LoRAMoEExperts", "MoEBlock", "MoEConfig", "MoELoRA", "attach_moe_lora"]
