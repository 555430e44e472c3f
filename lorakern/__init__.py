"""lorakern: kernels for batched heterogeneous LoRA over a paged rank-row adapter layout.

See README.md and DESIGN.md. Public contract: :mod:`lorakern.ops` (``add_lora``, ``lora_shrink``,
``lora_expand``) and :class:`lorakern.LoRAPlan`.
"""

__version__ = "0.1.0"

from lorakern.plan import LoRAPlan  # noqa: E402
from lorakern import ops  # noqa: E402
from lorakern.backends import select_backend  # noqa: E402
from lorakern.pool import (AdapterCatalog, AdapterError, AdapterPool, PoolCapacityError, PoolError,  # noqa: E402
                           PoolLayout, TargetSpec)
from lorakern.integrations.hf import LoRAModel, attach  # noqa: E402

__all__ = ["LoRAPlan", "ops", "select_backend", "__version__",
           "AdapterPool", "AdapterCatalog", "PoolLayout", "TargetSpec", "PoolError", "AdapterError",
           "PoolCapacityError", "attach", "LoRAModel"]
