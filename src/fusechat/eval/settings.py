"""The paper's evaluation settings (FuseEval in the FuseChat-3.0 repository), per target family and benchmark.

Judged benchmarks (answers for an LLM judge):
- AlpacaEval-2: alpaca_eval's `vllm_local_completions` decoder with `configs/{llama-3,gemma-2,qwen25}-alpacaeval.yaml`.
  That decoder passes only temperature, top_p, top_k and the stop tokens to vLLM, so the configs' presence,
  frequency and repetition penalties never reached the model; they are left out here too. max 4096 tokens.
- Arena-Hard (v0.1): the same decoder with `*-arenahard.yaml`: greedy, max 4096.
- MT-Bench: FastChat's `temperature_config` per category (`common.py`), 0.7 for other categories, both turns (the
  second sees the first answer); max 1024 tokens, FastChat's default in the generation FuseEval calls "official"
  (`generate_hf.sh`; its vLLM variant allows 4096).
- AlignBench v1.1: `config/temperature.json` per category, 0.7 otherwise, max 4096.

Local benchmarks: greedy. Math (Qwen2.5-Math eval, `utils.py` prompt types `llama3-math-cot`, `qwen25-math-cot`,
`gemma2-math-cot`): "reason step by step ... \\boxed{}" as the system turn (the user turn for Gemma, which has no
system turn); code (EvalPlus chat prompts in `Code-Eval/eval_plus/model.py`): an instruction and a prefilled answer
that opens a ```python block, cut at EvalPlus's stop strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat.config import SamplingParams

FAMILIES = ("llama", "qwen", "gemma")
JUDGED = ("alpaca_eval", "arena_hard", "mt_bench", "alignbench")
JUDGED_MAX_TOKENS = {"alpaca_eval": 4096, "arena_hard": 4096, "mt_bench": 1024, "alignbench": 4096}

ALPACA_EVAL_SAMPLING: dict[str, dict[str, Any]] = {
    "llama": {"temperature": 0.6, "top_p": 0.9},
    "gemma": {"temperature": 0.5, "top_p": 1.0},
    "qwen": {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
}
MT_BENCH_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
ALIGNBENCH_TEMPERATURE = {
    "数学计算": 0.1,
    "逻辑推理": 0.1,
    "角色扮演": 0.7,
    "文本写作": 0.7,
    "专业能力": 0.1,
    "中文理解": 0.1,
    "综合问答": 0.7,
    "基本任务": 0.1,
}
OTHER_CATEGORY_TEMPERATURE = 0.7  # both harnesses' default for a category not in their table

MATH_COT = "Please reason step by step, and put your final answer within \\boxed{}."
EVALPLUS_INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
EVALPLUS_RESPONSE = (
    "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
)
EVALPLUS_QWEN_SYSTEM = "You are an intelligent programming assistant to produce Python algorithmic solutions"
# EvalPlus's EOS strings for chat models (the special tokens among them end the turn anyway), plus "\n```".
EVALPLUS_STOPS = ("\nif __name__", "\ndef main(", "\nprint(", "\n#", "\n```")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=max_tokens)


def judged_sampling(benchmark: str, family: str, category: str | None, max_tokens: int) -> SamplingParams:
    """The decoding settings of one judged question."""
    if benchmark == "alpaca_eval":
        return SamplingParams(**ALPACA_EVAL_SAMPLING[family], max_tokens=max_tokens)
    if benchmark == "arena_hard":
        return greedy(max_tokens)
    table = MT_BENCH_TEMPERATURE if benchmark == "mt_bench" else ALIGNBENCH_TEMPERATURE
    temperature = table.get(category or "", OTHER_CATEGORY_TEMPERATURE)
    return SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_tokens)


def model_family(model: str) -> str | None:
    """llama, qwen or gemma: from a model directory's `model_type`, else from a hub id; None when neither says."""
    text = model.lower()
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            text = str(json.loads(config.read_text()).get("model_type", ""))
        except (OSError, ValueError):
            pass
    return next((f for f in ("gemma", "qwen", "llama") if f in text), None)


# --------------------------------------------------------------------------------------------- prompt styles
@dataclass(frozen=True)
class Styled:
    """A prompt as the harness builds it: the turns, a prefilled start of the answer, and text stops (the
    completion is cut at the first one, as vLLM's `stop` strings would)."""

    messages: list[dict[str, str]]
    prefix: str = ""
    stops: tuple[str, ...] = field(default=())


def styled(style: str, family: str, messages: list[dict[str, str]]) -> Styled:
    if style == "plain":
        return Styled(messages)
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    if style == "math_cot":
        if family == "gemma":
            return Styled([{"role": "user", "content": f"{question}\n{MATH_COT}"}])
        return Styled([{"role": "system", "content": MATH_COT}, {"role": "user", "content": question}])
    if style == "evalplus":
        task = question.strip()
        if family == "qwen":
            user = f"Can you complete the following Python function?\n```python\n{task}\n```\n"
            return Styled(
                [{"role": "system", "content": EVALPLUS_QWEN_SYSTEM}, {"role": "user", "content": user}],
                prefix="```python\n",
                stops=EVALPLUS_STOPS,
            )
        user = f"{EVALPLUS_INSTRUCTION}\n```\n{task}\n```\n"
        return Styled(
            [{"role": "user", "content": user}], prefix=f"{EVALPLUS_RESPONSE}\n```python\n", stops=EVALPLUS_STOPS
        )
    raise ValueError(f"unknown prompt style {style!r}")


def cut_at_stops(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
