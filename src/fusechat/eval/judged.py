"""Judged benchmarks (pure core): each harness's question file in, its answer file out, its results file scored.

Answer files, in the eval version under `judged/<benchmark>/`, in the layout each harness reads:
- AlpacaEval-2 `model_outputs.json`: a JSON list of {instruction, output, generator[, dataset]}, in the question
  file's order (alpaca_eval joins it to the reference outputs on `instruction`).
- Arena-Hard-Auto `<model_id>.jsonl`: v0.1 layout (the paper's harness; questions with `question_id` and `turns`):
  {question_id, answer_id, model_id, choices: [{index, turns: [{content, token_len}]}], tstamp, conv_metadata};
  current layout (questions with `uid` and `prompt`): {uid, ans_id, model, messages: [user, assistant with
  content {answer}], tstamp, metadata}. `token_len` counts the model's own tokens (the harness counts tiktoken
  tokens; its `add_markdown_info.py` recounts them for style control).
- MT-Bench (FastChat llm_judge) `<model_id>.jsonl`: {question_id, answer_id, model_id, choices: [{index, turns:
  [answer per turn]}], tstamp}, sorted by question_id.
- AlignBench `<model_id>.jsonl`: the question record plus {model_id, answer_id, answer}.

Scores, from the results each harness writes (or fusechat's judge step, in the same formats):
- AlpacaEval-2: `length_controlled_winrate` of the model's row in the `leaderboard.csv` that alpaca_eval writes
  next to `model_outputs.json` (under the annotator's name).
- Arena-Hard: `judgments.jsonl` (two games per question against the baseline): the win rate against the baseline,
  a decisive verdict (A>>B) counting 3 times and a tie half, which is what the harness's Bradley-Terry fit gives
  for one model against the baseline.
- MT-Bench: `judgments.jsonl` (FastChat's single-answer grading): the mean score over both turns, failed gradings
  (-1) left out.
- AlignBench: `judgments.jsonl`: the mean of the reasoning categories' means and the language categories' means.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat.errors import UserError

ANSWER_FILES = {
    "alpaca_eval": "model_outputs.json",
    "arena_hard": "{model_id}.jsonl",
    "mt_bench": "{model_id}.jsonl",
    "alignbench": "{model_id}.jsonl",
}
JUDGMENTS = "judgments.jsonl"
ARENA_HARD_MULTIPLIER = 3  # show_result.py: a decisive verdict counts as three battles
ALIGNBENCH_GROUPS = {
    "reasoning": ("数学计算", "逻辑推理"),
    "language": ("基本任务", "中文理解", "综合问答", "文本写作", "角色扮演", "专业能力"),
}


@dataclass(frozen=True)
class Question:
    """One judged question: its id, its user turns, its category, and the record as the file holds it."""

    id: Any
    turns: list[str]
    category: str | None
    record: dict[str, Any]


# --------------------------------------------------------------------------------------------- question files
def parse_question(benchmark: str, record: dict[str, Any], index: int) -> Question:
    """A question in the harness's own layout; ValueError naming the missing field otherwise."""
    if benchmark == "alpaca_eval":
        return Question(index, [_text(record, "instruction")], None, record)
    if benchmark == "arena_hard":
        if "uid" in record:  # the current layout (v0.1 reformatted, v2.0)
            return Question(record["uid"], [_text(record, "prompt")], record.get("category"), record)
        turns = record.get("turns")
        if "question_id" not in record or not isinstance(turns, list) or not turns:
            raise ValueError("expected question_id and turns: [{content}] (v0.1) or uid and prompt")
        return Question(record["question_id"], [_text(t, "content") for t in turns], record.get("category"), record)
    if benchmark == "mt_bench":
        turns = record.get("turns")
        if "question_id" not in record or not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError("expected question_id, category and turns: [text, ...]")
        return Question(record["question_id"], list(turns), record.get("category"), record)
    if benchmark == "alignbench":
        if "question_id" not in record:
            raise ValueError("expected question_id, category, subcategory, question, reference")
        return Question(record["question_id"], [_text(record, "question")], record.get("category"), record)
    raise ValueError(f"unknown benchmark {benchmark!r}")


def _text(record: Any, key: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"expected a text field {key!r}")
    return value


def read_questions(benchmark: str, path: str, limit: int | None, where: str) -> list[Question]:
    from fusechat.config import FieldMap, PromptSource
    from fusechat.prompts import iter_records

    source = PromptSource(name=benchmark, path=path, domain=benchmark, fields=FieldMap(prompt="unused"))
    questions = []
    for location, record in iter_records(source, where):
        try:
            questions.append(parse_question(benchmark, record, len(questions)))
        except ValueError as e:
            raise UserError(f"{location}: not a {benchmark} question: {e}") from None
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise UserError(f"{where}.path: {path}: no questions")
    return questions


# --------------------------------------------------------------------------------------------- answer files
def answer_id(model_id: str, question_id: Any) -> str:
    """Stable where the harnesses draw a random shortuuid (22 characters)."""
    return hashlib.sha256(f"{model_id}:{question_id}".encode()).hexdigest()[:22]


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Arena-Hard's style features (`add_markdown_info.py`), code blocks removed first."""
    for block in re.findall(r"```([^`]*)```", text):
        text = text.replace(block, "")
    return {
        "header_count": {f"h{n}": len(re.findall(rf"^#{{{n}}}\s", text, re.MULTILINE)) for n in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE)),
        },
        "bold_count": {
            "**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
            "__": len(re.findall(r"__[^_\n]+__", text)),
        },
    }


def answer_records(
    benchmark: str,
    questions: list[Question],
    answers: list[list[str]],
    num_tokens: list[list[int]],
    model_id: str,
    tstamp: float,
) -> list[dict[str, Any]]:
    """The answer file's records: one per question, `answers[i]` holding one text per turn."""
    if benchmark == "alpaca_eval":
        return [
            {
                **({"dataset": q.record["dataset"]} if "dataset" in q.record else {}),
                "instruction": q.turns[0],
                "output": a[0],
                "generator": model_id,
            }
            for q, a in zip(questions, answers, strict=True)
        ]
    if benchmark == "arena_hard":
        out = []
        for q, a, n in zip(questions, answers, num_tokens, strict=True):
            meta = {"token_len": n[0], **markdown_counts(a[0])}
            if "uid" in q.record:
                out.append(
                    {
                        "uid": q.id,
                        "ans_id": answer_id(model_id, q.id),
                        "model": model_id,
                        "messages": [
                            {"role": "user", "content": q.turns[0]},
                            {"role": "assistant", "content": {"answer": a[0]}},
                        ],
                        "tstamp": tstamp,
                        "metadata": meta,
                    }
                )
            else:
                out.append(
                    {
                        "question_id": q.id,
                        "answer_id": answer_id(model_id, q.id),
                        "model_id": model_id,
                        "choices": [{"index": 0, "turns": [{"content": a[0], "token_len": n[0]}]}],
                        "tstamp": tstamp,
                        "conv_metadata": meta,
                    }
                )
        return out
    if benchmark == "mt_bench":
        rows = [
            {
                "question_id": q.id,
                "answer_id": answer_id(model_id, q.id),
                "model_id": model_id,
                "choices": [{"index": 0, "turns": list(a)}],
                "tstamp": tstamp,
            }
            for q, a in zip(questions, answers, strict=True)
        ]
        return sorted(rows, key=lambda r: r["question_id"])
    if benchmark == "alignbench":
        return [
            {**q.record, "model_id": model_id, "answer_id": f"{q.id}_{model_id}", "answer": a[0]}
            for q, a in zip(questions, answers, strict=True)
        ]
    raise ValueError(f"unknown benchmark {benchmark!r}")


def write_answers(directory: Path, benchmark: str, records: list[dict[str, Any]], model_id: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ANSWER_FILES[benchmark].format(model_id=model_id)
    if benchmark == "alpaca_eval":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- scores
def arena_hard_score(judgments: Iterable[dict[str, Any]]) -> float | None:
    """Win rate (%) against the baseline. Game 1 shows the baseline as A, game 2 as B."""
    wins = total = 0.0
    for j in judgments:
        for game_no, game in enumerate(j.get("games", [])[:2]):
            verdict = (game or {}).get("score")
            if verdict not in ("A>>B", "A>B", "A=B", "B>A", "B>>A"):
                continue
            weight = ARENA_HARD_MULTIPLIER if ">>" in verdict else 1
            model_side = "B" if game_no == 0 else "A"
            if verdict == "A=B":
                wins += 0.5 * weight
            elif verdict[0] == model_side:
                wins += weight
            total += weight
    return round(100 * wins / total, 1) if total else None


def mt_bench_score(judgments: Iterable[dict[str, Any]], model_id: str) -> float | None:
    scores = [
        float(j["score"]) for j in judgments if j.get("model") == model_id and j.get("score", -1) not in (-1, None)
    ]
    return round(sum(scores) / len(scores), 2) if scores else None


def alignbench_score(judgments: Iterable[dict[str, Any]], model_id: str) -> float | None:
    by_category: dict[str, list[float]] = {}
    for j in judgments:
        if j.get("model_id", model_id) == model_id and j.get("score") is not None:
            by_category.setdefault(j.get("category"), []).append(float(j["score"]))
    means = {c: sum(v) / len(v) for c, v in by_category.items()}
    groups = [
        sum(means[c] for c in cats if c in means) / n
        for cats in ALIGNBENCH_GROUPS.values()
        if (n := sum(c in means for c in cats))
    ]
    return round(sum(groups) / len(groups), 2) if groups else None


def alpaca_eval_score(leaderboard_csv: str, model_id: str) -> float | None:
    for row in csv.DictReader(leaderboard_csv.splitlines()):
        if row.get("") == model_id and row.get("length_controlled_winrate"):
            return round(float(row["length_controlled_winrate"]), 1)
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    return rows


def judged_score(benchmark: str, directory: Path, model_id: str) -> float | None:
    """The benchmark's score from the results file in `directory`, or None when there is none yet."""
    if benchmark == "alpaca_eval":
        for path in sorted(directory.glob("*/leaderboard.csv")):
            score = alpaca_eval_score(path.read_text(encoding="utf-8"), model_id)
            if score is not None:
                return score
        return None
    path = directory / JUDGMENTS
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if benchmark == "arena_hard":
        return arena_hard_score(r for r in rows if r.get("model", model_id) == model_id)
    if benchmark == "mt_bench":
        return mt_bench_score(rows, model_id)
    return alignbench_score(rows, model_id)
