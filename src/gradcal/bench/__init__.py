"""``gradcal.bench``: a benchmark of calibration methods against reference posteriors.

:func:`run_bench` runs every task (:mod:`gradcal.bench.tasks`) with every method
(:mod:`gradcal.bench.methods`) at each simulation budget and seed, scores the draws against
the task's reference posterior (:mod:`gradcal.bench.metrics`), and writes a CSV and an HTML
page (:mod:`gradcal.bench.html`); :func:`merge_bench` combines parts run by separate
processes (:mod:`gradcal.bench.merge`). The command line is ``gradcal bench``.
"""

from gradcal.bench.merge import merge_bench
from gradcal.bench.methods import METHODS, Method, MethodOutput
from gradcal.bench.runner import MODES, run_bench
from gradcal.bench.tasks import TASKS, Reference, Task, make_task

__all__ = [
    "METHODS",
    "MODES",
    "TASKS",
    "Method",
    "MethodOutput",
    "Reference",
    "Task",
    "make_task",
    "merge_bench",
    "run_bench",
]
