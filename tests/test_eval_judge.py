"""The optional judge step against a tiny local OpenAI-compatible server (stdlib, in a thread; never the network),
the scores read back from the judgment files, and the comparison table."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_eval_judged import ARENA_V01, MT_BENCH, jsonl, judged_files

from fusechat.config import FusechatConfig
from fusechat.errors import UserError
from fusechat.eval.compare import comparison, pick_evals, scores_of
from fusechat.eval.judge import ARENA_HARD_RETRY, alignbench_rating, arena_hard_verdict, mt_bench_rating, run_judge
from fusechat.eval.stage import run_eval
from fusechat.store import RunStore

KEY = "sekrit-judge-key-123"
BASELINE = "THE BASELINE ANSWER"
JUDGE_PROMPTS = [  # FastChat's data/judge_prompts.jsonl layout (shortened templates)
    {
        "name": name,
        "type": "single",
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": template,
        "description": "Prompt for general questions",
        "category": "general",
        "output_format": "[[rating]]",
    }
    for name, template in (
        ("single-v1", "[Question]\n{question}\n[Answer]\n{answer}\nRate as [[rating]]."),
        ("single-math-v1", "[Question]\n{question}\n[Reference]\n{ref_answer_1}\n[Answer]\n{answer}"),
        ("single-v1-multi-turn", "MULTI {question_1} {answer_1} {question_2} {answer_2}"),
        (
            "single-math-v1-multi-turn",
            "MULTI {question_1} {ref_answer_1} {answer_1} {question_2} {ref_answer_2} {answer_2}",
        ),
    )
]


class Judge(BaseHTTPRequestHandler):
    """Canned verdicts per benchmark, recognised by their prompts."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        messages = body["messages"]
        text = messages[-1]["content"]
        if messages[0]["content"].startswith("Please act as an impartial judge"):  # Arena-Hard
            first_game = f"<|The Start of Assistant A's Answer|>\n{BASELINE}" in messages[1]["content"]
            if first_game and "cards" in messages[1]["content"] and len(messages) == 2:
                reply = "Both are fine; let me think."  # no label: the harness asks again
            else:
                reply = "My final verdict is [[B>>A]]" if first_game else "Tie: [[A=B]]"
        elif "[参考答案开始]" in text:  # AlignBench
            overall = 8 if "1加1" in text else 6
            reply = f"评价……{{'事实正确性': 7, '满足用户需求': 6, '综合得分': {overall}}}"
        else:  # MT-Bench
            reply = "Rating: [[6]]" if text.startswith("MULTI") else "Rating: [[8]]"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Judge.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def harness_files(tmp_path: Path) -> dict[str, str]:
    """The judge's own inputs, in the harnesses' layouts."""
    jsonl(tmp_path / "judge_prompts.jsonl", JUDGE_PROMPTS)
    refs = [
        {"question_id": q["question_id"], "model_id": "gpt-4", "choices": [{"index": 0, "turns": q["reference"]}]}
        for q in MT_BENCH
        if "reference" in q
    ]
    jsonl(tmp_path / "gpt-4.jsonl", refs)
    baseline = [
        {
            "question_id": q["question_id"],
            "answer_id": "x",
            "model_id": "gpt-4-0314",
            "choices": [{"index": 0, "turns": [{"content": BASELINE, "token_len": 4}]}],
            "tstamp": 0.0,
        }
        for q in ARENA_V01
    ]
    jsonl(tmp_path / "gpt-4-0314.jsonl", baseline)
    config = tmp_path / "alignbench_config"
    config.mkdir()
    (config / "dimension_set.json").write_text(json.dumps({"事实与解释型回答": ["事实正确性", "满足用户需求"]}))
    (config / "dimension_definition.json").write_text(json.dumps({"事实正确性": "准确", "满足用户需求": "满足"}))
    (config / "subcategory_question_mapping.json").write_text(
        json.dumps({"音乐": "事实与解释型回答", "初等数学": "事实与解释型回答"})
    )
    return {
        "judge_prompts": str(tmp_path / "judge_prompts.jsonl"),
        "references": str(tmp_path / "gpt-4.jsonl"),
        "baseline": str(tmp_path / "gpt-4-0314.jsonl"),
        "config_dir": str(config),
    }


def test_verdict_parsers_follow_the_harnesses():
    assert mt_bench_rating("so [[7.5]]") == 7.5 and mt_bench_rating("[6]") == 6 and mt_bench_rating("none") == -1
    assert arena_hard_verdict("x [[A>B]] y [[A>B]]") == ("A>B", False)
    assert arena_hard_verdict("no label") == (None, True)
    assert arena_hard_verdict("[[A>B]] then [[B>A]]") == (None, False)
    rating, score = alignbench_rating("评价。{'事实正确性': 7, '综合得分': 5}")
    assert (rating, score) == ({"事实正确性": 7, "综合得分": 5}, 5)
    assert alignbench_rating("没有评分") == ({}, -1)


@pytest.mark.slow
def test_judge_step_grades_each_benchmark_the_harness_way(tmp_path, tiny_llama, judge_server, monkeypatch):
    questions = judged_files(tmp_path)
    extra = harness_files(tmp_path)
    judged = {
        "alpaca_eval": {"path": questions["alpaca_eval"], "max_new_tokens": 4},
        "arena_hard": {"path": questions["arena_hard"], "max_new_tokens": 4, "baseline": extra["baseline"]},
        "mt_bench": {
            "path": questions["mt_bench"],
            "max_new_tokens": 4,
            "judge_prompts": extra["judge_prompts"],
            "references": extra["references"],
        },
        "alignbench": {"path": questions["alignbench"], "max_new_tokens": 4, "config_dir": extra["config_dir"]},
    }
    data = {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "d", "fields": {"prompt": "q"}}]},
        "target": {"path": str(tiny_llama)},
        "eval": {"engine": "transformers", "judged": judged},
    }
    store = RunStore(tmp_path / "runs/t")
    # No judge configured: nothing is sent anywhere.
    version = run_eval(FusechatConfig.model_validate(data), store, model="target", log=lambda _: None)
    assert Judge.seen == [] and not list(version.path.glob("judged/*/judgments.jsonl"))

    data["eval"]["judge"] = {"base_url": judge_server, "model": "judge-7b", "api_key_env": "FUSECHAT_TEST_KEY"}
    cfg = FusechatConfig.model_validate(data)
    monkeypatch.delenv("FUSECHAT_TEST_KEY", raising=False)
    with pytest.raises(
        UserError, match="eval.judge.api_key_env: the environment variable FUSECHAT_TEST_KEY is not set"
    ):
        run_eval(cfg, store, model="target", log=lambda _: None)
    monkeypatch.setenv("FUSECHAT_TEST_KEY", KEY)
    logged: list[str] = []
    again = run_eval(cfg, store, model="target", log=logged.append)
    assert again.ref == version.ref  # the judge is not part of the fingerprint: the answers were cached
    assert f"cached: {version.ref}" in logged
    assert any(line.startswith("judge alpaca_eval: graded by alpaca_eval itself") for line in logged)

    # 2 arena questions x 2 games (+1 second attempt), 3 MT-Bench questions x 2 turns, 2 AlignBench questions
    assert len(Judge.seen) == 5 + 6 + 2
    assert {s["path"] for s in Judge.seen} == {"/v1/chat/completions"}
    assert {s["auth"] for s in Judge.seen} == {f"Bearer {KEY}"}
    assert {(s["body"]["model"], s["body"]["temperature"]) for s in Judge.seen} == {("judge-7b", 0)}
    retry = [s for s in Judge.seen if s["body"]["messages"][-1]["content"] == ARENA_HARD_RETRY]
    assert len(retry) == 1 and len(retry[0]["body"]["messages"]) == 4

    judged_dir = version.path / "judged"
    mt = [json.loads(x) for x in (judged_dir / "mt_bench/judgments.jsonl").read_text().splitlines()]
    assert sorted((r["question_id"], r["turn"], r["judge"][1]) for r in mt) == [
        (81, 1, "single-v1"),
        (81, 2, "single-v1-multi-turn"),
        (101, 1, "single-math-v1"),
        (101, 2, "single-math-v1-multi-turn"),
        (111, 1, "single-math-v1"),
        (111, 2, "single-math-v1-multi-turn"),
    ]
    math_prompt = next(r["user_prompt"] for r in mt if (r["question_id"], r["turn"]) == (111, 2))
    assert "MULTI What is 2+2? 4 " in math_prompt and " And 3+3? 6 " in math_prompt  # references filled in
    arena = [json.loads(x) for x in (judged_dir / "arena_hard/judgments.jsonl").read_text().splitlines()]
    assert all([g["score"] for g in r["games"]] == ["B>>A", "A=B"] for r in arena)
    align = [json.loads(x) for x in (judged_dir / "alignbench/judgments.jsonl").read_text().splitlines()]
    assert {r["question_id"]: r["score"] for r in align} == {1: 6, 2: 8}
    assert all(
        r["dimensions"] == ["事实正确性", "满足用户需求"] and "1. 事实正确性: 准确\n" in r["judge_prompt"]
        for r in align
    )

    # AlpacaEval's own results file, where alpaca_eval writes it (next to model_outputs.json).
    board = judged_dir / "alpaca_eval/weighted_alpaca_eval_gpt4_turbo/leaderboard.csv"
    board.parent.mkdir()
    board.write_text(
        ",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,mode,avg_length,"
        "length_controlled_winrate,lc_standard_error\n"
        "gpt4_turbo,50.0,0.0,1,1,0,3,50.0,minimal,10,50.0,0.0\n"
        "llama,12.5,1.0,1,2,0,3,33.3,community,8,20.44,0.5\n"
    )
    assert scores_of(version) == {"alpaca_eval": 20.4, "arena_hard": 87.5, "mt_bench": 7.0, "alignbench": 7.0}

    # A second judge run asks nothing again; the key is in no file fusechat wrote.
    assert run_judge(cfg, version, log=lambda _: None) == {"arena_hard": 0, "mt_bench": 0, "alignbench": 0}
    assert len(Judge.seen) == 13
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    # One table of every model evaluated so far (`fusechat eval --compare`).
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**data, "eval": {**data["eval"], "judge": None}}))
    r = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "eval", "-c", "cfg.yaml", "--compare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for line in ("AlpacaEval-2 (LC %)", "Arena-Hard (WR %)", "MT-Bench (0-10)", "AlignBench (0-10)", "average (4"):
        assert line in r.stdout
    assert "30.5" in r.stdout  # (20.4 + 87.5 + 7.0 + 7.0) / 4, the paper's plain mean
    assert [label for label, _ in pick_evals(store, ["target"])] == ["target"]
    with pytest.raises(UserError, match="--model dpo: not evaluated yet"):
        pick_evals(store, ["dpo"])


def test_comparison_rows_deltas_and_the_paper_average(tmp_path):
    table = comparison(
        [
            ("before fusion", {"gsm8k": 50.0, "mt_bench": 8.4, "alpaca_eval": 28.3}),
            ("after SFT", {"gsm8k": 55.0, "mt_bench": 8.5}),
            ("after DPO", {"gsm8k": 60.0, "mt_bench": 9.0, "alpaca_eval": 65.4}),
        ],
        deltas=True,
    )
    assert table["header"] == ["benchmark", "before fusion", "after SFT", "after DPO", "Δ after SFT", "Δ after DPO"]
    assert table["rows"] == [
        ["AlpacaEval-2 (LC %)", 28.3, None, 65.4, None, 37.1],
        ["MT-Bench (0-10)", 8.4, 8.5, 9.0, 0.1, 0.6],
        ["gsm8k", 50.0, 55.0, 60.0, 5.0, 10.0],
    ]
    # the plain mean over the benchmarks every model has, MT-Bench on its 0-10 scale
    assert table["average"] == ["average (2 benchmarks)", 29.2, 31.75, 34.5, 2.55, 5.3]
    with pytest.raises(UserError, match="no eval version in .*; run fusechat eval first"):
        pick_evals(RunStore(tmp_path), None)


def test_mt_bench_judging_needs_the_references_and_prompts(tmp_path):
    from fusechat.eval.judge import mt_bench_tasks
    from fusechat.eval.judged import parse_question

    questions = [parse_question("mt_bench", q, i) for i, q in enumerate(MT_BENCH)]
    answers = {q.id: {"choices": [{"index": 0, "turns": ["a", "b"]}]} for q in questions}
    prompts = {p["name"]: p for p in JUDGE_PROMPTS}
    with pytest.raises(UserError, match=r"mt_bench.references: no reference answer for question 111 \(math\)"):
        mt_bench_tasks(questions, answers, prompts, {}, "m", "judge")
    with pytest.raises(UserError, match="judge_prompts: no prompt named 'single-v1-multi-turn'"):
        mt_bench_tasks(questions[:1], answers, {"single-v1": prompts["single-v1"]}, {}, "m", "judge")
    assert [t.key for t in mt_bench_tasks(questions[:1], answers, prompts, {}, "m", "judge")] == ["81:1", "81:2"]
