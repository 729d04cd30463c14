"""What the benchmark's cell server imports before it forks a process for each cell.

Each cell runs in a fresh child of one server process
(:func:`~gradcal.bench.metrics.run_isolated`). Modules a cell would otherwise import on
first use (torch's compiler stack, which ``torch.func`` and the optimizers pull in, sympy,
sbi) are imported here once, so that no cell pays seconds of imports in its own process.
Importing this module has no other effect.
"""

from __future__ import annotations

import importlib
import importlib.util

import gradcal.bench.runner  # noqa: F401 (the tasks, methods and metrics)

__all__ = ["WARM_MODULES"]

WARM_MODULES = (
    "sympy",
    "torch._dynamo",
    "torch._decomp.decompositions_for_jvp",
    "torch.distributed",
    "torch.onnx",
    "sbi.inference",
)  # imported when installed

for _name in WARM_MODULES:
    if importlib.util.find_spec(_name.split(".")[0]) is not None:
        importlib.import_module(_name)
