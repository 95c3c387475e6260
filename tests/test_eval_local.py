"""Benchmarks scored locally: the paper's prompts per family, GSM8K-style math through math-verify, HumanEval- and
MBPP-style code through the sandbox, and `fusechat eval` end to end on a tiny model."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.config import FusechatConfig
from fusechat.eval.local import accuracy_by_set, check_responses, close_fence, code_tests, eval_rows, math_reference
from fusechat.eval.settings import EVALPLUS_RESPONSE, MATH_COT, cut_at_stops, model_family, styled

GSM8K = [
    {"question": "Janet has 3 eggs and buys 4 more. How many eggs does she have?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A shop sells 1,200 pens a day. How many in two days?", "answer": "1200*2=2400\n#### 2,400"},
]
HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "test": "METADATA = {'author': 'x'}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    }
]
MBPP = [
    {
        "task_id": "Mbpp/3",
        "prompt": '"""\nWrite a function to compute the square root.\nassert root(4) == 2\n"""\n',
        "entry_point": "root",
        "test_list": ["assert math.isclose(root(9), 3)", "assert root(4) == 2"],
        "test_imports": ["import math"],
    }
]
SOLUTION = "def add(a: int, b: int) -> int:\n    return a + b\n"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local_config(tmp_path, model=None, extra_sets=()) -> dict:
    return {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "d", "fields": {"prompt": "q"}}]},
        **({"target": {"path": str(model)}} if model else {}),
        "score": {"math": {"workers": 1}, "code": {"workers": 2}},
        "eval": {
            "engine": "transformers",
            "max_new_tokens": 6,
            "sets": [
                {
                    "name": "gsm8k",
                    "path": write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K),
                    "domain": "math",
                    "fields": {"prompt": "question", "answer": "answer"},
                    "check": "math",
                    "style": "math_cot",
                },
                {
                    "name": "humaneval",
                    "path": write_jsonl(tmp_path / "humaneval.jsonl", HUMANEVAL),
                    "domain": "code",
                    "fields": {"prompt": "prompt", "tests": "test"},
                    "entry_point": "entry_point",
                    "check": "code",
                    "style": "evalplus",
                },
                *extra_sets,
            ],
        },
    }


def test_prompt_styles_per_family():
    user = [{"role": "user", "content": "What is 1+1?"}]
    assert styled("math_cot", "llama", user).messages == [
        {"role": "system", "content": MATH_COT},
        {"role": "user", "content": "What is 1+1?"},
    ]
    assert styled("math_cot", "gemma", user).messages == [{"role": "user", "content": f"What is 1+1?\n{MATH_COT}"}]
    code = [{"role": "user", "content": "def f():\n    pass\n\n"}]
    llama = styled("evalplus", "llama", code)
    assert llama.messages[0]["content"].endswith("markdown code block:\n```\ndef f():\n    pass\n```\n")
    assert llama.prefix == f"{EVALPLUS_RESPONSE}\n```python\n" and "\n```" in llama.stops
    qwen = styled("evalplus", "qwen", code)
    assert qwen.messages[0]["role"] == "system" and qwen.prefix == "```python\n"
    assert styled("plain", "qwen", user).messages == user


def test_stops_fences_references_and_tests():
    assert cut_at_stops("    return 1\n```\nmore", ("\n```", "\n#")) == ("    return 1", True)
    assert cut_at_stops("x = 1", ("\n#",)) == ("x = 1", False)
    assert close_fence("text\n```python\ncode") == "text\n```python\ncode\n```"
    assert close_fence("```python\ncode\n```") == "```python\ncode\n```"
    assert math_reference("step\n#### 2,400") == "2400" and math_reference(27.0) == "27.0"
    assert code_tests(HUMANEVAL[0]["test"], "add").endswith("assert candidate(-1, 1) == 0\n\ncheck(add)\n")
    assert code_tests(["assert f(1) == 2", "assert f(2) == 3"]) == "assert f(1) == 2\nassert f(2) == 3"
    assert code_tests(["assert math.pi > 3"], "f", ["import math"]) == "import math\nassert math.pi > 3"


def test_model_family_from_config_or_name(tmp_path, tiny_llama, tiny_qwen2, tiny_mistral_bpe):
    assert [model_family(str(p)) for p in (tiny_llama, tiny_qwen2, tiny_mistral_bpe)] == ["llama", "qwen", None]
    assert model_family("google/gemma-2-9b-it") == "gemma"
    assert model_family("meta-llama/Llama-3.1-8B-Instruct") == "llama"


@pytest.mark.slow
def test_known_correct_answers_score_one_and_wrong_ones_zero(tmp_path):
    """GSM8K-, HumanEval- and MBPP-style: the real math-verify workers and the real sandbox."""
    mbpp = {
        "name": "mbpp",
        "path": write_jsonl(tmp_path / "mbpp.jsonl", MBPP),
        "domain": "code",
        "fields": {"prompt": "prompt", "tests": "test_list"},
        "test_setup": "test_imports",
        "check": "code",
        "style": "evalplus",
    }
    cfg = FusechatConfig.model_validate(local_config(tmp_path, extra_sets=[mbpp]))
    rows = eval_rows(cfg.eval.sets)
    assert [r["set"] for r in rows] == ["gsm8k", "gsm8k", "humaneval", "mbpp"]
    prefix = f"{EVALPLUS_RESPONSE}\n```python\n"  # what the evalplus prompt prefills; the model goes on from there
    right = [
        "She had 3 and bought 4, so \\boxed{7}.",
        "Two days: 2 * 1200 = 2400. The answer is 2400",
        prefix + SOLUTION,  # cut at "\n```" like EvalPlus: the block is left open
        prefix + "def root(x):\n    return x ** 0.5\n```\nIt uses the power operator.",
    ]
    wrong = [
        "3 + 4 = \\boxed{8}",
        "\\boxed{2,401}",
        prefix + "def add(a, b):\n    return a - b\n",
        prefix + "def root(x):\n    return x / 2\n",
    ]
    verdicts = check_responses(rows, right, cfg)
    assert verdicts == ["math:correct", "math:correct", "code:pass", "code:pass"]
    assert accuracy_by_set(rows, verdicts) == {"gsm8k": 1.0, "humaneval": 1.0, "mbpp": 1.0}
    verdicts = check_responses(rows, wrong, cfg)
    assert verdicts == ["math:wrong", "math:wrong", "code:fail", "code:fail"]
    assert accuracy_by_set(rows, verdicts) == {"gsm8k": 0.0, "humaneval": 0.0, "mbpp": 0.0}


@pytest.mark.slow
def test_fusechat_eval_end_to_end_on_local_files(tmp_path, tiny_llama):
    missing = {"name": "mbpp", "path": str(tmp_path / "nowhere.jsonl"), "domain": "code", "fields": {"prompt": "p"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(local_config(tmp_path, tiny_llama, extra_sets=[missing])))
    r = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "eval", "-c", "cfg.yaml", "--model", "target"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("skipped mbpp") == 1 and "nowhere.jsonl (file not found)" in r.stdout
    assert "wrote: eval/v001" in r.stdout and "│ gsm8k" in r.stdout and "│ humaneval" in r.stdout
    results = pq.read_table(tmp_path / "runs/t/eval/v001/data/results.parquet").to_pylist()
    assert [x["set"] for x in results] == ["gsm8k", "gsm8k", "humaneval"]
    assert all(x["verdict"].startswith("math:") for x in results[:2])
    assert results[2]["verdict"] in (
        "code:pass",
        "code:fail",
        "code:timeout",
        "code:syntax_error",
        "code:undefined_name",
    )
    assert results[2]["response"].startswith(EVALPLUS_RESPONSE)  # the prefilled answer start is part of it
    manifest = json.loads((tmp_path / "runs/t/eval/v001/manifest.json").read_text())
    assert manifest["counts"]["skipped"] == [f"mbpp: {tmp_path / 'nowhere.jsonl'}"]
    assert set(manifest["counts"]["accuracy"]) == {"gsm8k", "humaneval"}


def test_errors_name_the_set_in_the_config_even_after_a_skipped_one(tmp_path, tiny_llama):
    from fusechat.errors import UserError
    from fusechat.eval.stage import run_eval
    from fusechat.store import RunStore

    (tmp_path / "empty.jsonl").write_text("")
    data = local_config(tmp_path, tiny_llama)
    data["eval"]["sets"] = [
        {"name": "gone", "path": str(tmp_path / "gone.jsonl"), "domain": "d", "fields": {"prompt": "q"}},
        {"name": "empty", "path": str(tmp_path / "empty.jsonl"), "domain": "d", "fields": {"prompt": "q"}},
    ]
    cfg = FusechatConfig.model_validate(data)
    logged: list[str] = []
    with pytest.raises(UserError, match=r"^eval.sets\[1\].path: .*empty.jsonl: no prompts$"):
        run_eval(cfg, RunStore(cfg.run_dir), model="target", log=logged.append)
    assert logged == [f"eval: skipped gone: {tmp_path / 'gone.jsonl'} (file not found)"]
