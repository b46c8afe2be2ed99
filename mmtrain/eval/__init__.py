"""mmtrain.eval: product-task metrics, the majority baseline, batched generation and chat on a model directory.

The demo calls `evaluate`, `majority_baseline` and `format_table`; see docs/eval.md.
"""

from mmtrain.eval.baseline import majority_baseline
from mmtrain.eval.evaluate import evaluate, format_table, write_results
from mmtrain.eval.generate import Generator, load_model

__all__ = ["Generator", "evaluate", "format_table", "load_model", "majority_baseline", "write_results"]
