"""Judged benchmarks: question files in each harness's layout (synthetic content), answer files that each harness
reads as it is, written by a real tiny model.

What each harness reads from an answer file (from its code and README):
- alpaca_eval (`main.evaluate`, README "model_outputs"): a JSON list of dicts; `instruction` (joined to the
  reference outputs), `output`, `generator` (the model's name; `dataset` kept when the questions have it).
- arena-hard-auto v0.1 (`utils.load_model_answers`, `gen_judgment.py`, `show_result.py`): `<model>.jsonl`, one
  record per `question_id`: `model_id`, `choices[0].turns[i].content`, `turns[0].token_len` (or
  `conv_metadata.token_len`), and for style control `conv_metadata.{token_len, header_count, list_count,
  bold_count}`. The current layout: `uid`, `model`, `messages[-1].content.answer`, `metadata.*`.
- FastChat llm_judge (`common.load_model_answers`, `run_judge_single`): `<model>.jsonl`, one record per
  `question_id`: `model_id`, `choices[0].turns[0]` and `[1]` (strings).
- AlignBench (`judge.py`, `show_result.py`): `<model>.jsonl` of the question records with `answer`, `model_id`,
  `answer_id`; the judge reads `question`, `reference`, `answer`, `category`, `subcategory`.
"""

import json
from pathlib import Path

import pytest
import yaml

from fusechat.config import FusechatConfig, load_config
from fusechat.errors import UserError
from fusechat.eval.judged import (
    answer_records,
    arena_hard_score,
    markdown_counts,
    parse_question,
    read_questions,
)
from fusechat.eval.settings import JUDGED_MAX_TOKENS, judged_sampling
from fusechat.eval.stage import run_eval
from fusechat.store import RunStore

ALPACA = [
    {"dataset": "helpful_base", "instruction": "Say hello politely.", "output": "Hello!", "generator": "gpt4_turbo"},
    {"dataset": "koala", "instruction": "Name a primary color.", "output": "Red.", "generator": "gpt4_turbo"},
    {"dataset": "selfinstruct", "instruction": "Add 2 and 3.", "output": "5", "generator": "gpt4_turbo"},
]
ARENA_V01 = [
    {
        "question_id": "328c149ed45a41c0b9d6f14659e63599",
        "category": "arena-hard-v0.1",
        "cluster": "ABC Sequence Puzzles & Groups",
        "turns": [{"content": "Write a short folk melody in ABC notation."}],
    },
    {
        "question_id": "b43c07656ead4150b360294ee932b410",
        "category": "arena-hard-v0.1",
        "cluster": "Card puzzles",
        "turns": [{"content": "Can three cards be sorted with one swap?"}],
    },
]
ARENA_V2 = [
    {"uid": "2edbb5f36f5b42be", "category": "hard_prompt", "subcategory": "coding", "prompt": "Reverse a list."}
]
MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a travel note.", "Rewrite it in one line."]},
    {
        "question_id": 111,
        "category": "math",
        "turns": ["What is 2+2?", "And 3+3?"],
        "reference": ["4", "6"],
    },
    {"question_id": 101, "category": "reasoning", "turns": ["Who is taller?", "Why?"], "reference": ["A", "B"]},
]
ALIGNBENCH = [
    {
        "question_id": 1,
        "category": "专业能力",
        "subcategory": "音乐",
        "question": "单簧管的调性是什么？",
        "reference": "降B调。",
        "evidences": [{"url": "https://example.org", "quote": "..."}],
    },
    {
        "question_id": 2,
        "category": "数学计算",
        "subcategory": "初等数学",
        "question": "1加1等于几？",
        "reference": "2",
        "evidences": [],
    },
]


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def judged_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(ALPACA))
    return {
        "alpaca_eval": str(tmp_path / "alpaca_eval.json"),
        "arena_hard": jsonl(tmp_path / "arena_question.jsonl", ARENA_V01),
        "mt_bench": jsonl(tmp_path / "mt_question.jsonl", MT_BENCH),
        "alignbench": jsonl(tmp_path / "data_v1.1_release.jsonl", ALIGNBENCH),
    }


def judged_config(tmp_path: Path, model: Path, **judged) -> FusechatConfig:
    return FusechatConfig.model_validate(
        {
            "name": "t",
            "workdir": str(tmp_path / "runs"),
            "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "d", "fields": {"prompt": "q"}}]},
            "target": {"path": str(model)},
            "eval": {"engine": "transformers", "judged": judged},
        }
    )


# --------------------------------------------------------------------------------------------- pure
def test_question_layouts_and_errors():
    assert parse_question("alpaca_eval", ALPACA[0], 0).turns == ["Say hello politely."]
    q = parse_question("arena_hard", ARENA_V01[0], 0)
    assert (q.id, q.turns, q.category) == (
        ARENA_V01[0]["question_id"],
        [ARENA_V01[0]["turns"][0]["content"]],
        "arena-hard-v0.1",
    )
    q = parse_question("arena_hard", ARENA_V2[0], 0)
    assert (q.id, q.turns) == ("2edbb5f36f5b42be", ["Reverse a list."])
    q = parse_question("mt_bench", MT_BENCH[1], 0)
    assert (q.id, q.turns, q.category) == (111, ["What is 2+2?", "And 3+3?"], "math")
    assert parse_question("alignbench", ALIGNBENCH[0], 0).turns == ["单簧管的调性是什么？"]
    with pytest.raises(ValueError, match="turns"):
        parse_question("mt_bench", {"question_id": 1, "category": "writing", "turns": [{"content": "x"}]}, 0)
    with pytest.raises(ValueError, match="'instruction'"):
        parse_question("alpaca_eval", {"prompt": "x"}, 0)


def test_a_question_file_in_another_layout_names_the_line(tmp_path):
    path = jsonl(tmp_path / "q.jsonl", [MT_BENCH[0], {"id": 3, "prompt": "x"}])
    with pytest.raises(UserError, match=r"q.jsonl:2: not a mt_bench question: expected question_id"):
        read_questions("mt_bench", path, None, "eval.judged.mt_bench")


def test_decoding_follows_the_paper_per_family_and_category():
    llama = judged_sampling("alpaca_eval", "llama", None, 4096)
    assert (llama.temperature, llama.top_p, llama.max_tokens) == (0.6, 0.9, 4096)
    assert judged_sampling("alpaca_eval", "gemma", None, 4096).temperature == 0.5
    qwen = judged_sampling("alpaca_eval", "qwen", None, 4096)
    assert (qwen.temperature, qwen.top_p, qwen.top_k, qwen.repetition_penalty) == (0.7, 0.8, 20, 1.0)
    assert judged_sampling("arena_hard", "llama", None, 4096).temperature == 0.0
    assert JUDGED_MAX_TOKENS == {"alpaca_eval": 4096, "arena_hard": 4096, "mt_bench": 1024, "alignbench": 4096}
    assert [judged_sampling("mt_bench", "llama", c, 4096).temperature for c in ("writing", "math", "stem", "x")] == [
        0.7,
        0.0,
        0.1,
        0.7,
    ]
    assert [judged_sampling("alignbench", "qwen", c, 4096).temperature for c in ("文本写作", "数学计算", "x")] == [
        0.7,
        0.1,
        0.7,
    ]


def test_answer_records_per_layout():
    questions = [parse_question("arena_hard", r, i) for i, r in enumerate([*ARENA_V01[:1], *ARENA_V2])]
    out = answer_records("arena_hard", questions, [["# Title\n- a\n**b**"], ["ok"]], [[7], [1]], "m", 1.0)
    assert out[0]["choices"] == [{"index": 0, "turns": [{"content": "# Title\n- a\n**b**", "token_len": 7}]}]
    assert out[0]["conv_metadata"]["header_count"]["h1"] == 1
    assert (out[0]["conv_metadata"]["list_count"]["unordered"], out[0]["conv_metadata"]["bold_count"]["**"]) == (1, 1)
    assert out[1]["messages"][-1] == {"role": "assistant", "content": {"answer": "ok"}}
    assert (out[1]["uid"], out[1]["model"], out[1]["metadata"]["token_len"]) == ("2edbb5f36f5b42be", "m", 1)
    mt = [parse_question("mt_bench", r, i) for i, r in enumerate(MT_BENCH)]
    rows = answer_records("mt_bench", mt, [["a", "b"], ["c", "d"], ["e", "f"]], [[1, 1]] * 3, "m", 1.0)
    assert [r["question_id"] for r in rows] == [81, 101, 111]  # FastChat's reorg_answer_file sorts them


def test_markdown_counts_skip_code_blocks():
    counts = markdown_counts("## Head\n```\n# not a header\n- nor a list\n```\n1. one\n__u__")
    assert counts["header_count"]["h2"] == 1 and counts["header_count"]["h1"] == 0
    assert counts["list_count"] == {"ordered": 1, "unordered": 0}
    assert counts["bold_count"] == {"**": 0, "__": 1}


def test_arena_hard_score_is_the_weighted_win_rate():
    judgments = [
        {"question_id": "a", "games": [{"score": "B>>A"}, {"score": "A=B"}]},  # model much better, then a tie
        {"question_id": "b", "games": [{"score": "A>B"}, {"score": None}]},  # baseline better; no verdict
    ]
    assert arena_hard_score(judgments) == round(100 * 3.5 / 5, 1)


# --------------------------------------------------------------------------------------------- on a tiny model
def assert_alpaca_eval_reads(path: Path, questions: list[dict], model_id: str) -> None:
    outputs = json.loads(path.read_text())
    assert isinstance(outputs, list) and len(outputs) == len(questions)
    for out, q in zip(outputs, questions, strict=True):
        assert out["instruction"] == q["instruction"]  # joined to the reference outputs on it
        assert isinstance(out["output"], str)
        assert out["generator"] == model_id
        assert out["dataset"] == q["dataset"]


def assert_arena_hard_v01_reads(path: Path, questions: list[dict], model_id: str) -> None:
    assert path.name == f"{model_id}.jsonl"  # load_model_answers: the file name is the model
    answers = {(r := json.loads(line))["question_id"]: r for line in path.read_text().splitlines()}
    assert set(answers) == {q["question_id"] for q in questions}
    for a in answers.values():
        assert a["model_id"] == model_id and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        turns = a["choices"][0]["turns"]
        assert len(turns) == 1 and isinstance(turns[0]["content"], str) and isinstance(turns[0]["token_len"], int)
        meta = a["conv_metadata"]
        assert set(meta) == {"token_len", "header_count", "list_count", "bold_count"}
        assert set(meta["header_count"]) == {f"h{i}" for i in range(1, 7)}
        assert set(meta["list_count"]) == {"ordered", "unordered"} and set(meta["bold_count"]) == {"**", "__"}


def assert_mt_bench_reads(path: Path, questions: list[dict], model_id: str) -> None:
    assert path.name == f"{model_id}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == sorted(q["question_id"] for q in questions)
    by_id = {q["question_id"]: q for q in questions}
    for r in rows:
        assert r["model_id"] == model_id and isinstance(r["answer_id"], str)
        turns = r["choices"][0]["turns"]
        assert len(turns) == len(by_id[r["question_id"]]["turns"]) == 2
        assert all(isinstance(t, str) for t in turns)


def assert_alignbench_reads(path: Path, questions: list[dict], model_id: str) -> None:
    assert path.name == f"{model_id}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(questions)
    for r, q in zip(rows, questions, strict=True):
        assert {k: r[k] for k in q} == q  # the question record, unchanged
        assert r["model_id"] == model_id and r["answer_id"] == f"{q['question_id']}_{model_id}"
        assert isinstance(r["answer"], str)


@pytest.mark.slow
def test_answer_files_validate_against_each_harness(tmp_path, tiny_llama):
    files = judged_files(tmp_path)
    cfg = judged_config(tmp_path, tiny_llama, **{b: {"path": p, "max_new_tokens": 6} for b, p in files.items()})
    logged = []
    version = run_eval(cfg, RunStore(cfg.run_dir), model="target", log=logged.append)
    counts = version.manifest["counts"]
    model_id = counts["model_id"]
    assert (model_id, counts["family"]) == ("llama", "llama")
    judged = version.path / "judged"
    assert_alpaca_eval_reads(judged / "alpaca_eval/model_outputs.json", ALPACA, model_id)
    assert_arena_hard_v01_reads(judged / f"arena_hard/{model_id}.jsonl", ARENA_V01, model_id)
    assert_mt_bench_reads(judged / f"mt_bench/{model_id}.jsonl", MT_BENCH, model_id)
    assert_alignbench_reads(judged / f"alignbench/{model_id}.jsonl", ALIGNBENCH, model_id)
    assert {b: c["answers"] for b, c in counts["judged"].items()} == {
        "alpaca_eval": 3,
        "arena_hard": 2,
        "mt_bench": 3,
        "alignbench": 2,
    }
    assert counts["accuracy"] == {} and not (version.path / "data").exists()
    # The same config again is a cache hit; a changed question file is not.
    again = run_eval(cfg, RunStore(cfg.run_dir), model="target", log=logged.append)
    assert again.ref == version.ref
    jsonl(tmp_path / "arena_question.jsonl", ARENA_V01[:1])
    assert run_eval(cfg, RunStore(cfg.run_dir), model="target", log=logged.append).ref != version.ref


@pytest.mark.slow
def test_arena_hard_current_layout_answers(tmp_path, tiny_qwen2):
    path = jsonl(tmp_path / "question.jsonl", ARENA_V2)
    cfg = judged_config(tmp_path, tiny_qwen2, arena_hard={"path": path, "max_new_tokens": 4})
    version = run_eval(cfg, RunStore(cfg.run_dir), model="target", log=lambda _: None)
    assert version.manifest["counts"]["family"] == "qwen"
    (row,) = [json.loads(x) for x in (version.path / "judged/arena_hard/qwen2.jsonl").read_text().splitlines()]
    assert (row["uid"], row["model"], row["messages"][0]) == (
        "2edbb5f36f5b42be",
        "qwen2",
        {"role": "user", "content": "Reverse a list."},
    )
    assert isinstance(row["messages"][-1]["content"]["answer"], str) and isinstance(row["ans_id"], str)
    assert set(row["metadata"]) == {"token_len", "header_count", "list_count", "bold_count"}


def test_recipes_name_every_benchmark_and_skip_missing_files(in_tmp):
    from fusechat.eval.stage import evaluate_models, present

    root = Path(__file__).resolve().parents[1] / "configs"
    families = {"llama-3.1-8b": "llama", "qwen-2.5-7b": "qwen", "gemma-2-9b": "gemma"}
    for name in ("llama-3.1-8b", "qwen-2.5-7b", "gemma-2-9b", "llama-3.2-3b", "llama-3.2-1b"):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.eval.family == families.get(name, "llama")
        assert [s.name for s in cfg.eval.sets] == ["gsm8k", "math500", "amc23", "humaneval", "mbpp"]
        assert [s.style for s in cfg.eval.sets] == ["math_cot"] * 3 + ["evalplus"] * 2
        assert all(
            getattr(cfg.eval.judged, b) is not None for b in ("alpaca_eval", "arena_hard", "mt_bench", "alignbench")
        )
        assert cfg.eval.judge is None  # never by default
        found = present(cfg)  # nothing under data/eval here
        assert not found and len(found.skipped) == 9
        logged: list[str] = []
        assert evaluate_models(cfg, RunStore(cfg.run_dir), ["target", "sft", "dpo"], log=logged.append) == {}
        assert len(logged) == 10 and logged[0] == "eval: skipped gsm8k: data/eval/gsm8k.jsonl (file not found)"
        assert logged[-1] == "eval: skipped (none of the configured benchmark files exists)"


def test_question_layouts_of_the_recipes_parse(tmp_path):
    """The fields the recipes map exist in the real files' layouts (synthetic rows)."""
    from fusechat.eval.local import eval_rows

    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(root / "llama-3.1-8b.yaml")
    layouts = {
        "gsm8k": {"question": "Q?", "answer": "so\n#### 18"},
        "math500": {
            "problem": "P?",
            "solution": "s",
            "answer": "\\frac12",
            "subject": "Algebra",
            "level": 2,
            "unique_id": "u",
        },
        "amc23": {"id": 0, "problem": "A?", "answer": 27.0, "url": "u", "question": "A?"},
        "humaneval": {
            "task_id": "HumanEval/0",
            "prompt": "def f():\n",
            "entry_point": "f",
            "canonical_solution": "    return 1\n",
            "test": "def check(candidate):\n    assert candidate() == 1\n",
            "contract": "",
            "base_input": [[]],
            "plus_input": [],
            "atol": 0,
        },
        "mbpp": {
            "task_id": "Mbpp/2",
            "prompt": '"""\nWrite f.\nassert f() == 1\n"""\n',
            "entry_point": "f",
            "code": "def f(): return 1",
            "test_list": ["assert f() == 1"],
            "test_imports": [],
            "test": "",
            "base_input": [],
            "plus_input": [],
            "atol": 0,
        },
    }
    sets = []
    for s in cfg.eval.sets:
        sets.append(s.model_copy(update={"path": jsonl(tmp_path / f"{s.name}.jsonl", [layouts[s.name]])}))
    rows = eval_rows(sets)
    assert [r["reference"].get("answer") for r in rows[:3]] == ["so\n#### 18", "\\frac12", 27.0]
    assert rows[3]["reference"] == {"tests": layouts["humaneval"]["test"], "entry_point": "f"}
    assert rows[4]["reference"] == {"tests": ["assert f() == 1"], "setup": []}
    assert yaml.safe_dump(cfg.eval.model_dump(mode="json"))  # the section round-trips


@pytest.mark.slow
def test_engine_auto_uses_vllm_when_installed_and_able(tmp_path, tiny_llama):
    """One engine serves every benchmark: decoding settings change between batches (MT-Bench's per-category
    temperatures, its second turn, a greedy local set) without reloading the model."""
    import importlib.util

    from fusechat.demo.tiny import TinySpec, make_tiny

    installed = importlib.util.find_spec("vllm") is not None
    # head size 32: vLLM's CPU attention supports it (the default tiny model's 24 is not)
    small = make_tiny(
        tmp_path / "llama32", TinySpec(arch="llama", chat="llama3", seed=1, hidden=64, heads=2, kv_heads=1)
    )
    files = judged_files(tmp_path)
    gsm8k = {
        "name": "gsm8k",
        "path": jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "#### 2"}]),
        "domain": "math",
        "fields": {"prompt": "question", "answer": "answer"},
        "check": "math",
        "style": "math_cot",
    }
    for model, engine in ((small, "vllm" if installed else "transformers"), (tiny_llama, "transformers")):
        data = judged_config(tmp_path, model, mt_bench={"path": files["mt_bench"], "max_new_tokens": 4}).model_dump()
        data["eval"].update(engine="auto", max_new_tokens=4, sets=[gsm8k])
        cfg = FusechatConfig.model_validate(data)
        logged: list[str] = []
        version = run_eval(cfg, RunStore(cfg.run_dir), model="target", log=logged.append)
        counts = version.manifest["counts"]
        assert counts["engine"] == engine
        assert counts["accuracy"] == {"gsm8k": 0.0} and counts["judged"]["mt_bench"]["answers"] == 3
        answers = version.path / "judged/mt_bench" / f"{counts['model_id']}.jsonl"
        rows = [json.loads(x) for x in answers.read_text().splitlines()]
        assert all(len(r["choices"][0]["turns"]) == 2 for r in rows)
    if installed:  # the default tiny model's head size: generate instead, said in one line
        assert any(line.startswith("eval: generate instead of vllm (eval.model") for line in logged)
