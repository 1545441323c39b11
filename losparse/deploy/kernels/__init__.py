"""Optional fused kernels for the compact inference layer (extra `losparse[triton]`).

Nothing here is imported by the rest of the package: `CompactLoSparseLinear.forward` stays the
portable PyTorch path, and a dispatcher may call `fused_compact_forward` where it measures it faster.
Importing this package does not import triton; the names load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "triton_available": "triton_compact",
    "fused_compact_forward": "triton_compact",
    "kept_position": "triton_compact",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
