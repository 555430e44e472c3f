"""Thin modules over the ops (DESIGN.md §4). :mod:`lorakern.nn.mla`: MLA attention with LoRA on every projection."""

from lorakern.nn.mla import MLAAttention, MLAConfig, MLALoRA

__all__ = ["MLAAttention", "MLAConfig", "MLALoRA"]
