"""From a trained model to something to ship: compact and merge (`compact`), save and load with every field
checked (`serialization`, `validation`), contiguous neurons (`permute`), per-layer forms (`dispatch`), ONNX
(`onnx`) and the optional Triton kernel (`kernels`).

The names below are what `losparse.export` (the flat layout's module) held; prefer `losparse.compact`,
`losparse.save`, `losparse.load`, ... from the package root.
"""

from losparse.deploy.compact import RATIO_NOTE, compact, format_report, merge, parameter_report
from losparse.deploy.serialization import load, save
from losparse.deploy.validation import (FORMAT_VERSION, LOSPARSE_CONFIG_FILE, SUPPORTED_FORMAT_VERSIONS, WEIGHTS_FILE,
                                        CheckedCheckpoint, check_checkpoint)
