"""The heuristic dataflow (FlashDecoding++ section 3): per GPU, dtype and linear shape [N, K], which GEMM
implementation (gemv | flat | cublas) and kernel config serves each batch size M.

- ``table``: the lookup table (JSON per GPU, shipped in ``tables/``), O(1) dispatch ``choose_impl``.
- ``tuner``: builds tables by profiling on the current GPU (``fdpp tune``).
- ``shapes``: the linear shapes of a model.

NOTE: the hardware-aware choice of the decode-attention split count belongs here too
(``choose_decode_splits``); it is owned by the attention kernels and added beside these modules.
"""
from fdpp.dataflow.shapes import PRESET_SHAPES, linear_shapes, preset_shapes
from fdpp.dataflow.table import (
    DispatchTable,
    MRange,
    ShapeEntry,
    choose_impl,
    rule_choice,
    set_dispatch_table,
    table_for_device,
    use_dispatch_table,
)

__all__ = [
    "PRESET_SHAPES",
    "DispatchTable",
    "MRange",
    "ShapeEntry",
    "choose_impl",
    "linear_shapes",
    "preset_shapes",
    "rule_choice",
    "set_dispatch_table",
    "table_for_device",
    "use_dispatch_table",
]
