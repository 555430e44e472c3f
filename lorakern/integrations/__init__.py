"""Integrations with other libraries (DESIGN.md §4). :mod:`lorakern.integrations.hf`: Hugging Face transformers and
PEFT — :func:`attach` wraps a model's linear layers for batched heterogeneous LoRA and returns a
:class:`LoRAModel` (see docs/hf.md)."""

from lorakern.integrations.hf import FUSED_GROUPS, LoRAModel, attach, match_target_modules

__all__ = ["attach", "LoRAModel", "FUSED_GROUPS", "match_target_modules"]
