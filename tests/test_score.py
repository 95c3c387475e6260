"""`fusechat score`: the pure core, the math verifier, and the stage on a hand-made samples version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hand_samples import sample_row, write_samples
from typer.testing import CliRunner

from fusechat.config import ScoreConfig, load_config
from fusechat.errors import UserError
from fusechat.score.math_check import MathChecker, check_answer, extract_answer
from fusechat.score.stage import Scorers, combine, run_score, score_rows
from fusechat.shards import ShardSpec
from fusechat.store import RunStore


# --------------------------------------------------------------------------------------------- math verifier
@pytest.mark.parametrize(
    "text, answer",
    [
        ("First 3, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{\\{1, \\sqrt{2}\\}}", "\\{1, \\sqrt{2}\\}"),
        ("So the answer is 42. Check: 6*7", "42"),
        ("We get 3 apples and then 1,250 pears", "1250"),
        ("nothing numeric here", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "response, reference, verdict",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
        ("The answer is 3/4.", "0.75", "correct"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", "correct"),
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", "correct"),
        ("\\boxed{12.0}", "12", "correct"),
        ("\\boxed{1/3}", "0.5", "wrong"),
        ("I give up.", "7", "no_answer"),
    ],
)
def test_check_answer(response, reference, verdict):
    assert check_answer(response, reference) == verdict


def test_math_checker_bounds_each_check():
    checker = MathChecker(timeout_s=1, workers=1)
    try:
        verdicts = checker.check_many([("\\boxed{9^{9^{9^{9}}}}", "1"), ("\\boxed{2}", "2")])
    finally:
        checker.close()
    assert verdicts == ["timeout", "correct"]


# --------------------------------------------------------------------------------------------- pure core
def _rows():
    user = [{"role": "user", "content": "q"}]
    return [
        {
            "prompt_id": "a",
            "source": "s",
            "sample_index": 0,
            "text": "hello",
            "domain": "chat",
            "messages": user,
            "reference": None,
        },
        {
            "prompt_id": "b",
            "source": "s",
            "sample_index": 0,
            "text": "\\boxed{2}",
            "domain": "math",
            "messages": user,
            "reference": {"answer": "2"},
        },
        {
            "prompt_id": "b",
            "source": "s",
            "sample_index": 1,
            "text": "\\boxed{3}",
            "domain": "math",
            "messages": user,
            "reference": {"answer": "2"},
        },
        {
            "prompt_id": "c",
            "source": "s",
            "sample_index": 0,
            "text": "\\boxed{3}",
            "domain": "math",
            "messages": user,
            "reference": None,
        },
        {
            "prompt_id": "d",
            "source": "t",
            "sample_index": 0,
            "text": "x",
            "domain": "code",
            "messages": user,
            "reference": {"tests": "assert x"},
        },
    ]


def test_score_rows_routes_and_combines():
    score = ScoreConfig(routes={"math": ["reward", "math"], "code": ["code"]})
    calls = {}

    def reward(convs):
        calls["reward"] = len(convs)
        assert all(c[-1]["role"] == "assistant" for c in convs)
        return (
            [float(len(c[-1]["content"])) for c in convs],
            [c[-1]["content"] == "hello" for c in convs],
            [5] * len(convs),
            ["truncated" if c[-1]["content"] == "hello" else "ok" for c in convs],
        )

    scorers = Scorers(
        reward=reward,
        math=lambda items: ["correct" if t == "\\boxed{2}" else "wrong" for t, _ in items],
        code=lambda items: ["timeout" for _ in items],
    )
    out, timings = score_rows(_rows(), score, scorers)
    assert [r["verdict"] for r in out] == [
        "reward:truncated",
        "reward:ok,math:correct",
        "reward:ok,math:wrong",
        "reward:ok,math:no_reference",
        "code:timeout",
    ]
    assert [r["correct"] for r in out] == [None, True, False, None, False]
    assert [r["reward"] for r in out] == [5.0, 9.0, 9.0, 9.0, None]
    assert calls["reward"] == 4 and set(timings) == {"reward", "math", "code"}
    assert timings["math"]["responses"] == 2  # the prompt without a reference is not sent to the verifier


def test_a_row_that_raises_fails_alone():
    score = ScoreConfig(routes={"math": ["reward", "math"], "code": ["code"]})
    logs = []

    def reward(convs):  # raises for one response, whatever else is in the call
        if any(c[-1]["content"] == "\\boxed{3}" for c in convs):
            raise ValueError("cannot score this one")
        return [1.0] * len(convs), [False] * len(convs), [5] * len(convs), ["ok"] * len(convs)

    def math(items):
        if len(items) > 1:
            raise RuntimeError("pool broke")
        return ["correct" if t == "\\boxed{2}" else "wrong" for t, _ in items]

    out, _ = score_rows(
        _rows(), score, Scorers(reward=reward, math=math, code=lambda i: ["pass"] * len(i)), logs.append
    )
    assert [r["verdict"] for r in out] == [
        "reward:ok",
        "reward:ok,math:correct",
        "reward:error,math:wrong",
        "reward:error,math:no_reference",
        "code:pass",
    ]
    assert [r["reward"] for r in out] == [1.0, 1.0, None, None, None]
    assert logs == [
        "reward: row (prompt_id=b, source=s, sample_index=1) failed alone, verdict reward:error: "
        "ValueError: cannot score this one",
        "reward: row (prompt_id=c, source=s, sample_index=0) failed alone, verdict reward:error: "
        "ValueError: cannot score this one",
    ]

    def broken(items):
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model"):  # every row fails: the scorer is broken, not a row
        score_rows(_rows(), score, Scorers(reward=broken, math=math, code=lambda i: ["pass"] * len(i)))


def test_combine():
    assert combine({"reward": "ok"}) is None
    assert combine({"math": "correct", "code": "pass"}) is True
    assert combine({"math": "correct", "code": "error"}) is None
    assert combine({"math": "no_reference", "code": "fail"}) is False


# --------------------------------------------------------------------------------------------- the stage
MATH = [("What is 1/2 as a decimal?", "0.5"), ("What is 2+3?", "5"), ("What is 6*7?", None)]
CODE = [("Write add(a, b).", ["assert add(1, 2) == 3"]), ("Write neg(x).", "assert neg(2) == -2")]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(root: Path, reward_path: Path, **score_extra) -> Path:
    _write_jsonl(root / "chat.jsonl", [{"q": f"Tell me about topic {i}."} for i in range(3)])
    _write_jsonl(root / "math.jsonl", [{"q": q, "a": a} for q, a in MATH])
    _write_jsonl(root / "code.jsonl", [{"q": q, "t": t} for q, t in CODE])
    score = {
        "reward_model": {"path": str(reward_path), "dtype": "float32", "batch_size": 4},
        "routes": {"math": ["reward", "math"], "code": ["reward", "code"]},
        "shard_size": 7,
        "math": {"timeout_s": 5, "workers": 1},
        "code": {"timeout_s": 1.5, "workers": 2},
        **score_extra,
    }
    cfg = {
        "name": "t",
        "workdir": str(root / "runs"),
        "prompts": {
            "sources": [
                {"name": "chat", "path": str(root / "chat.jsonl"), "domain": "chat", "fields": {"prompt": "q"}},
                {
                    "name": "gsm",
                    "path": str(root / "math.jsonl"),
                    "domain": "math",
                    "fields": {"prompt": "q", "answer": "a"},
                },
                {
                    "name": "py",
                    "path": str(root / "code.jsonl"),
                    "domain": "code",
                    "fields": {"prompt": "q", "tests": "t"},
                },
            ]
        },
        "score": score,
    }
    path = root / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


RESPONSES = {
    "chat": ["A short answer.", "A much longer and more detailed answer about the topic."],
    "math": ["The answer is 0.5.", "\\boxed{5}", "I think it is 9."],
    "code": [
        "```python\ndef add(a, b):\n    return a + b\n\ndef neg(x):\n    return -x\n```",
        "```python\nwhile True:\n    pass\n```",
    ],
}


def _make_samples(cfg_path: Path) -> tuple:
    """prompts via the real stage; a samples version written by hand (the sample stage is not needed here)."""
    from fusechat.prompts import read_prompts, run_prompts

    cfg = load_config(cfg_path, check_trl=False)
    store = RunStore(cfg.run_dir)
    prompts = run_prompts(cfg, store, log=lambda _: None)
    rows = [
        sample_row(p["prompt_id"], source, k, text)
        for p in read_prompts(prompts).to_pylist()
        for source in ("alpha", "beta")
        for k, text in enumerate(RESPONSES[p["domain"]][:2])
    ]
    samples = write_samples(store, prompts, rows, files=2)
    return cfg, store, samples, rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_reward):
    root = tmp_path_factory.mktemp("score")
    cfg_path = _config(root, tiny_reward)
    cfg, store, samples, rows = _make_samples(cfg_path)
    logs: list[str] = []
    version = run_score(cfg, store, pinned={}, log=logs.append)
    return cfg_path, cfg, store, samples, rows, version, logs


def _by_key(table):
    return {(r["prompt_id"], r["source"], r["sample_index"]): r for r in table.to_pylist()}


@pytest.mark.slow
def test_stage_scores_every_sample(world):
    from fusechat.config import RewardModelConfig
    from fusechat.score.reward_model import RewardModel

    _, cfg, store, samples, rows, version, _ = world
    scores = pq.read_table(version.data)
    assert scores.num_rows == len(rows) == 32
    assert {"prompt_id", "source", "sample_index", "reward", "correct", "verdict"} <= set(scores.column_names)
    got = _by_key(scores)
    domain_of = {}
    for r in got.values():
        domain_of[r["prompt_id"]] = r["domain"]
    verdicts = {(domain_of[r["prompt_id"]], r["verdict"]) for r in got.values()}
    assert verdicts == {
        ("chat", "reward:ok"),
        ("math", "reward:ok,math:correct"),
        ("math", "reward:ok,math:wrong"),
        ("math", "reward:ok,math:no_reference"),
        ("code", "reward:ok,code:pass"),
        ("code", "reward:ok,code:timeout"),
    }
    code_correct = {r["sample_index"]: r["correct"] for r in got.values() if r["domain"] == "code"}
    assert code_correct == {0: True, 1: False}
    assert all(r["correct"] is None for r in got.values() if r["domain"] == "chat")
    # the stage's rewards are the reward model's, one response at a time
    rm = RewardModel(RewardModelConfig(path=cfg.score.reward_model.path, dtype="float32"))
    from fusechat.prompts import read_prompts

    messages = {p["prompt_id"]: p["messages"] for p in read_prompts(store.resolve("prompts")).to_pylist()}
    some = rows[:5]
    direct = rm.score(
        [[*messages[r["prompt_id"]], {"role": "assistant", "content": r["text"]}] for r in some], batch_size=1
    ).rewards
    for r, d in zip(some, direct, strict=True):
        assert got[(r["prompt_id"], r["source"], r["sample_index"])]["reward"] == pytest.approx(d, abs=1e-4)
    m = version.manifest
    assert m["inputs"] == {"samples": samples.name, "prompts": "v001"}
    assert m["counts"]["by_verdict"]["code:timeout"] == 4 and m["counts"]["responses"] == 32
    assert set(m["timings"]["scorers"]) == {"reward", "math", "code"}
    assert (
        m["timings"]["scorers"]["reward"]["responses"] == 32
        and m["timings"]["scorers"]["reward"]["responses_per_s"] > 0
    )


@pytest.mark.slow
def test_rerun_is_a_cache_hit(world):
    _, cfg, store, _, _, version, _ = world
    logs: list[str] = []
    again = run_score(cfg, store, pinned={}, log=logs.append)
    assert again.path == version.path and logs == [f"cached: {version.ref}"]


@pytest.mark.slow
def test_shards_fill_one_version_and_resume(world, tmp_path):
    cfg_path, _, store, _, _, version, _ = world
    cfg = load_config(cfg_path, ["score.code.timeout_s=1"], check_trl=False)  # a new fingerprint
    logs: list[str] = []
    assert run_score(cfg, store, pinned={}, shard=ShardSpec(1, 3), log=logs.append) is None
    partial = store.partials("scores")[0]
    assert sorted(p.name for p in (partial / "data").glob("*.parquet")) == [
        "chunk-000000.parquet",
        "chunk-000003.parquet",
    ]
    assert json.loads((partial / "progress.json").read_text())["rows_done"] == 14
    done = run_score(cfg, store, pinned={}, log=logs.append)  # no --shard: does what is left
    assert "resuming: 2 of 5 chunks already scored" in logs
    assert done is not None and done.name != version.name and not store.partials("scores")
    a, b = _by_key(pq.read_table(version.data)), _by_key(pq.read_table(done.data))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["verdict"] == b[k]["verdict"] and a[k]["reward"] == pytest.approx(b[k]["reward"], abs=1e-4)


@pytest.mark.slow
def test_cli_score(world):
    from fusechat.cli import app

    cfg_path, *_ = world
    result = CliRunner().invoke(
        app, ["score", "-c", str(cfg_path), "--input", "samples=v001", "--set", "score.routes={}"]
    )
    assert result.exit_code == 0, result.output
    assert "reward:ok: 32" in result.output and "reward: 32 responses" in result.output
    bad = CliRunner().invoke(app, ["score", "-c", str(cfg_path), "--set", "score.reward_model.path=./missing"])
    assert bad.exit_code == 2 and "score.reward_model.path: ./missing: no such model directory" in bad.output


# --------------------------------------------------------------------------------------------- errors
def _error(cfg_path: Path, overrides: list[str] | None = None, pinned: dict | None = None) -> str:
    cfg = load_config(cfg_path, overrides, check_trl=False)
    with pytest.raises(UserError) as e:
        run_score(cfg, RunStore(cfg.run_dir), pinned=pinned or {}, log=lambda _: None)
    assert not (cfg.run_dir / "scores").exists() or not any((cfg.run_dir / "scores").iterdir())
    return str(e.value)


@pytest.fixture(scope="module")
def err_world(tmp_path_factory, tiny_reward):
    root = tmp_path_factory.mktemp("score_err")
    cfg_path = _config(root, tiny_reward)
    _make_samples(cfg_path)
    return root, cfg_path


def test_error_missing_samples(tmp_path, tiny_reward):
    cfg_path = _config(tmp_path, tiny_reward)
    assert "no complete samples version" in _error(cfg_path)
    _make_samples(cfg_path)
    assert "--input samples=v009" in _error(cfg_path, pinned={"samples": "v009"})


def test_error_reward_model(err_world, tiny_reward, tiny_llama):
    root, cfg_path = err_world
    msg = _error(cfg_path, [f"score.reward_model.path={root}/nope"])
    assert msg.startswith("score.reward_model.path:") and "no such model directory" in msg
    assert "not a sequence-classification" in _error(cfg_path, [f"score.reward_model.path={tiny_llama}"])
    two = root / "two_labels"
    shutil.copytree(tiny_reward, two, dirs_exist_ok=True)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    (two / "config.json").write_text(json.dumps(config))
    assert "has 2 outputs" in _error(cfg_path, [f"score.reward_model.path={two}"])
    assert "hub-org/not-cached" in _error(cfg_path, ["score.reward_model.path=hub-org/not-cached"])
    assert "score.reward_model: not set" in _error(cfg_path, ["score.reward_model=null"])


def test_error_math_route_without_references(err_world):
    _, cfg_path = err_world
    msg = _error(cfg_path, ["score.routes.chat=[reward, math]"])
    assert msg.startswith("score.routes.chat: routed to the math verifier") and "fields.answer" in msg
