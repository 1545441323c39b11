"""`losparse.load`: one loader for what any method saved (LoSparse compact, structured, their hybrids).

Each method says which files its output directory holds (`CompressionMethod.saved_markers`) and how to
rebuild it (`CompressionMethod.load`); this module only picks the method.
"""

from __future__ import annotations

import os
from typing import Any

from losparse.deploy.serialization import load as load_compact
from losparse.methods import method_for_directory


def load(path: str, device: Any = None, **kwargs: Any) -> Any:
    """The model saved in `path`, rebuilt by the method that saved it, in eval mode.

    kwargs go to that method's loader: for LoSparse checkpoints `dtype`, `optimize`, `example_inputs`
    (`losparse.deploy.serialization.load`); the structured methods take none. A directory no method
    claims is read as a LoSparse checkpoint, whose checks name what is missing (a dense fine-tuned model
    is a plain transformers directory: `from_pretrained` loads it).
    """
    method = method_for_directory(path) if os.path.isdir(path) else None
    if method is not None:
        return method.load(path, device=device, **kwargs)
    return load_compact(path, device=device, **kwargs)
