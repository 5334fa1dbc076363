"""Evaluation, one loop for every study: conditions x examples -> per-example losses and generations ->
comparisons with intervals over users -> one report writer and one plot (`report.py`).

`evaluate_examples` runs it on the data contract (any user table and examples; the persona and PENS studies
are data adapters in `e2p.data` plus lists of conditions); `compare` holds the paired intervals; `scoring` the
per-row losses and the shuffled control's rule (`derangement`), which training curves share.
"""
from .compare import compare, paired_bootstrap
from .loop import Condition, conditions_for, evaluate_examples, run_conditions, verdict

__all__ = ["Condition", "compare", "conditions_for", "evaluate_examples", "paired_bootstrap", "run_conditions",
           "verdict"]
