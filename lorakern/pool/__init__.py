"""Adapter memory management: the device pool of rank rows (DESIGN.md §2), its host cache tier, loaders (PEFT
directories, safetensors blobs, in-memory tensors) and the million-adapter catalog. See docs/pool.md.

    layout = PoolLayout.llama(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8)
    pool = AdapterPool(layout, max_rows=4096, max_slots=256, max_rank=64, dtype=torch.bfloat16, device="cuda",
                       catalog=AdapterCatalog.open("adapters.lkcat"))
    with pool.wave(request_adapter_ids) as req_slots:
        plan = LoRAPlan.from_slots(req_slots[token_to_request], pool.ranks)
        for layer in range(32):
            lorakern.ops.add_lora(out, x, *pool.args(layer, "qkv_proj"), plan)
"""

from lorakern.pool.catalog import AdapterCatalog, CatalogBuilder, CatalogEntry
from lorakern.pool.errors import (AdapterDtypeError, AdapterError, AdapterFileError, AdapterFormatError,
                                  AdapterInUseError, AdapterMismatchError, AdapterStateError, CatalogError,
                                  PoolCapacityError, PoolError, UnknownAdapterError)
from lorakern.pool.host_cache import HostCache, HostRecord
from lorakern.pool.loaders import (AdapterSource, AdapterWeights, PeftDir, SafetensorsBlob, TensorAdapter,
                                   adapter_blob, save_peft_dir)
from lorakern.pool.pool import AdapterPool, PoolStats, Wave
from lorakern.pool.packed import (PackedAdapter, moe_pool_layout, packed_to_peft,  # packed MoE format
                                 peft_to_packed)
from lorakern.pool.spec import LLAMA_MODULES, PoolLayout, RowFormat, TargetSpec

__all__ = [
    "AdapterPool", "PoolStats", "Wave", "PoolLayout", "TargetSpec", "RowFormat", "LLAMA_MODULES",
    "HostCache", "HostRecord", "AdapterCatalog", "CatalogBuilder", "CatalogEntry",
    "AdapterSource", "AdapterWeights", "PeftDir", "SafetensorsBlob", "TensorAdapter", "save_peft_dir",
    "adapter_blob",
    "PackedAdapter", "peft_to_packed", "packed_to_peft", "moe_pool_layout",
    "PoolError", "AdapterError", "UnknownAdapterError", "AdapterFileError", "AdapterFormatError",
    "AdapterMismatchError", "AdapterDtypeError", "AdapterStateError", "AdapterInUseError", "PoolCapacityError",
    "CatalogError",
]
