"""Evaluation, as the paper measured it (FuseEval): one module per job.

- `models`: which model runs (`resolve_model`) and the name its answer files carry;
- `settings`: the paper's decoding per family and benchmark, and its prompt styles;
- `local`: benchmarks scored here (exact, math-verify, the code sandbox);
- `judged`: the judged benchmarks' question files in, answer files out, results files scored;
- `judge`: the optional judge step (an OpenAI-compatible endpoint);
- `compare`: one comparable table of several models;
- `stage`: the shell (`run_eval`, `evaluate_models`).
"""

from fusechat.eval.local import accuracy_by_set, check_responses, eval_rows, is_correct
from fusechat.eval.models import resolve_model
from fusechat.eval.stage import evaluate_models, fusion_models, run_eval

__all__ = [
    "accuracy_by_set",
    "check_responses",
    "eval_rows",
    "evaluate_models",
    "fusion_models",
    "is_correct",
    "resolve_model",
    "run_eval",
]
