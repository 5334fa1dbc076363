"""Evaluation: conditions x examples -> losses and generations -> comparisons with intervals -> report.

`evaluate_examples` runs the loop on the data contract (any user table and examples); `evaluate_persona`
is the persona study's table; `compare` holds the paired intervals and identification shared by both.
"""
from .compare import compare, derangement, identification_accuracy, paired_bootstrap
from .loop import Condition, conditions_for, evaluate_examples, run_conditions, verdict
from .persona import evaluate_persona, persona_report, plot_perplexities

__all__ = ["Condition", "compare", "conditions_for", "derangement", "evaluate_examples", "evaluate_persona",
           "identification_accuracy", "paired_bootstrap", "persona_report", "plot_perplexities", "run_conditions",
           "verdict"]
