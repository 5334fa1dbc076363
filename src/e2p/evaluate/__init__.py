"""Evaluation, one loop for every study: conditions x examples -> per-example losses and generations ->
comparisons with intervals over users -> one report writer and one plot (`report.py`).

`evaluate_examples` runs it on the data contract (any user table and examples; the persona and PENS studies
are data adapters in `e2p.data` plus lists of conditions); `compare` holds the paired intervals and
identification accuracy.
"""
from .scoring import derangement  # the one rule for the shuffled control, shared with training curves
from .compare import compare, identification_accuracy, paired_bootstrap
from .loop import Condition, conditions_for, evaluate_examples, run_conditions, verdict

__all__ = ["Condition", "compare", "conditions_for", "derangement", "evaluate_examples", "identification_accuracy",
           "paired_bootstrap", "run_conditions", "verdict"]
