"""The sample stage without generation: chunk plan, seeds, system-prompt policy, rendering (one BOS), stop ids,
and the user errors that must stop the stage before any model loads."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from fusechat.cli import app
from fusechat.config import SourceModel
from fusechat.sample.engines import Completion, cut_at_stop
from fusechat.sample.render import chat_template, render_ids, stop_token_ids, with_system
from fusechat.sample.stage import chunk_seed, completion_rows, dataset_rows, plan_chunks
from fusechat.tokenizers import load_tokenizer


# --------------------------------------------------------------------------------------------- pure core
def test_plan_chunks_takes_only_domains_with_k_and_names_chunks():
    src = SourceModel(name="m", model="x", samples={"math": 2, "code": 0}, default_samples=1, chunk_size=2)
    domains = ["math", "code", "chat", "math", "code", "math"]
    assert plan_chunks(src, domains) == [("m-00000", [0, 2]), ("m-00001", [3, 5])]
    assert plan_chunks(SourceModel(name="n", model="x"), domains) == []  # default_samples 0: answers nothing


def test_chunk_seed_depends_on_source_chunk_and_k_only():
    a = chunk_seed(42, "m", "m-00001", 5)
    assert a == chunk_seed(42, "m", "m-00001", 5)
    assert (
        len(
            {
                a,
                chunk_seed(43, "m", "m-00001", 5),
                chunk_seed(42, "n", "m-00001", 5),
                chunk_seed(42, "m", "m-00002", 5),
                chunk_seed(42, "m", "m-00001", 4),
            }
        )
        == 5
    )
    assert 0 <= a < 2**32


def test_cut_at_stop_keeps_the_stop_token_and_marks_length():
    assert cut_at_stop([5, 6, 2, 0, 0], [2, 9], budget=10) == Completion([5, 6, 2], "stop")
    assert cut_at_stop([5, 6, 7, 8], [2], budget=3) == Completion([5, 6, 7], "length")
    assert cut_at_stop([5, 6, 7, 2], [2], budget=3) == Completion([5, 6, 7], "length")  # stop beyond the context


def test_completion_rows():
    rows = completion_rows("p1", "m", [Completion([1, 2], "stop"), Completion([3], "length")], lambda ids: str(ids))
    assert rows == [
        {
            "prompt_id": "p1",
            "source": "m",
            "sample_index": 0,
            "text": "[1, 2]",
            "num_tokens": 2,
            "finish_reason": "stop",
            "identical_samples": False,
        },
        {
            "prompt_id": "p1",
            "source": "m",
            "sample_index": 1,
            "text": "[3]",
            "num_tokens": 1,
            "finish_reason": "length",
            "identical_samples": False,
        },
    ]
    same = completion_rows("p2", "m", [Completion([4], "stop"), Completion([4], "stop")], lambda ids: str(ids))
    assert [r["identical_samples"] for r in same] == [True, True]
    alone = completion_rows("p3", "m", [Completion([4], "stop")], lambda ids: str(ids))
    assert alone[0]["identical_samples"] is False  # one sample is not a repetition


def test_dataset_rows_take_the_first_k_answers_as_finished_responses():
    src = SourceModel(name="405b", engine="dataset", dataset="omi2", samples={"math": 2})
    prompts = [{"prompt_id": "a", "domain": "math"}, {"prompt_id": "b", "domain": "math"}]
    rows = dataset_rows(src, prompts, {"a": ["x", "y", "z"], "b": ["w"]})
    assert [(r["prompt_id"], r["sample_index"], r["text"]) for r in rows] == [
        ("a", 0, "x"),
        ("a", 1, "y"),
        ("b", 0, "w"),
    ]
    assert {r["finish_reason"] for r in rows} == {"stop"} and {r["num_tokens"] for r in rows} == {None}
    assert dataset_rows(src, prompts, {"a": ["x", "x"]})[0]["identical_samples"] is True


def test_system_prompt_policies():
    user = [{"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "be terse"}, *user]
    assert with_system(user, "be kind", "keep") == [{"role": "system", "content": "be kind"}, *user]
    assert with_system(own, "be kind", "keep") == own  # the prompt's own system turn wins
    assert with_system(own, None, "merge") == [{"role": "user", "content": "be terse\n\nhi"}]
    assert with_system(user, "be kind", "drop") == user
    assert with_system(user, None, "merge") == user


# --------------------------------------------------------------------------------------------- rendering
def test_llama_template_renders_exactly_one_bos(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    msgs = [{"role": "user", "content": "hi"}]
    ids = render_ids(tok, msgs, tok.chat_template)
    header = tok.convert_tokens_to_ids(["<|start_header_id|>", "user", "<|end_header_id|>"])
    assert ids[:4] == [bos, *header]
    assert ids.count(bos) == 1
    assert ids[-5:] == tok.convert_tokens_to_ids(["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n"])
    # The trap this avoids: the template's text tokenized with special tokens gets a second BOS.
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok(text)["input_ids"][:2] == [bos, bos]


def test_template_override_inline_and_file(tiny_qwen2, tmp_path):
    tok = load_tokenizer(tiny_qwen2)
    inline = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    src = SourceModel(name="m", model=str(tiny_qwen2), chat_template=inline)
    assert chat_template(src, tok, "sources[0]") == inline
    assert tok.decode(render_ids(tok, [{"role": "user", "content": "2+2?"}], inline)) == "Q: 2+2?\nA:"
    (tmp_path / "t.jinja").write_text(inline)
    assert chat_template(src.model_copy(update={"chat_template": str(tmp_path / "t.jinja")}), tok, "s") == inline
    assert chat_template(SourceModel(name="m", model="x"), tok, "s") == tok.chat_template


def test_stop_ids_join_generation_config_and_tokenizer(tiny_llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    tok = load_tokenizer(model)
    eot, end = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids(str(model), tok) == [eot]
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [end, eot]}))
    assert stop_token_ids(str(model), tok) == sorted([eot, end])


# --------------------------------------------------------------------------------------------- user errors
def write_world(root, model, **source) -> str:
    (root / "p.jsonl").write_text("".join(json.dumps({"q": f"question {i}?"}) + "\n" for i in range(3)))
    cfg = {
        "name": "e",
        "workdir": "runs",
        "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "chat", "fields": {"prompt": "q"}}]},
        "sources": [{"name": "m", "model": str(model), "engine": "transformers", "default_samples": 1, **source}],
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return str(root / "cfg.yaml")


@pytest.fixture()
def no_template_model(tiny_llama, tmp_path):
    model = tmp_path / "plain"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


NO_SYSTEM_TEMPLATE = (  # like Gemma-2's
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("missing path", [], "sources[0].model (m): ./models/nope: directory not found"),
        ("hub id offline", [], "sources[0].model (m): cannot load 'nobody-xyz/no-such-model'"),
        ("no template", [], "has no chat template; set sources[0].chat_template"),
        ("template file", [], "sources[0].chat_template: missing.jinja: file not found"),
        (
            "unknown engine",
            ["--set", "sources.0.engine=sglang"],
            "sources[0].engine: Input should be 'vllm', 'transformers' or 'dataset'",
        ),
        ("unknown source", ["--source", "zz"], "--source zz: not in the config's sources (m)"),
        ("bad shard", ["--shard", "3/2"], "--shard '3/2': expected I/N with 1 <= I <= N"),
        ("pinned other stage", ["--input", "scores=v001"], "--input scores=...: sample reads only prompts"),
        ("system rejected", [], "sources[0].chat_template (m): prompt "),
        (  # the conftest models have 96 / 4 heads = 24
            "vllm cpu head size",
            ["--set", "sources.0.engine=vllm"],
            "sources[0].model (m): head size 24 is not supported by vLLM's CPU attention (supported: 32, 64,",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(
    case, args, message, in_tmp, tiny_llama, no_template_model, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = {
        "missing path": "./models/nope",
        "hub id offline": "nobody-xyz/no-such-model",
        "no template": no_template_model,
    }.get(case, tiny_llama)
    extra = {
        "template file": {"chat_template": "missing.jinja"},
        "system rejected": {"chat_template": NO_SYSTEM_TEMPLATE, "system_prompt": "Be brief."},
    }.get(case, {})
    cfg = write_world(in_tmp, model, **extra)
    runner = CliRunner()
    assert runner.invoke(app, ["prompts", "-c", cfg]).exit_code == 0
    result = runner.invoke(app, ["sample", "-c", cfg, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    if case == "system rejected":
        assert "the template failed: System role not supported (for a template without system turns set " in lines[0]
    assert not (in_tmp / "runs" / "e" / "samples").exists() or not any((in_tmp / "runs" / "e" / "samples").iterdir())


def test_a_dataset_source_samples_the_kept_answers_without_a_model(tmp_path):
    import pyarrow.parquet as pq
    from recipe_fixtures import write_openmathinstruct2

    from fusechat.config import FusechatConfig
    from fusechat.errors import UserError
    from fusechat.prompts import read_responses, run_prompts
    from fusechat.sample import run_sample
    from fusechat.store import RunStore

    omi2 = {
        "name": "openmathinstruct2",
        "path": str(write_openmathinstruct2(tmp_path / "omi2.jsonl", n=5, solutions=3)),
        "domain": "math",
        "fields": {"prompt": "problem", "answer": "expected_answer", "response": "generated_solution"},
    }
    data = {
        "name": "d",
        "workdir": str(tmp_path / "runs"),
        "prompts": {"sources": [omi2]},
        "sources": [
            {
                "name": "llama-3.1-405b-instruct",
                "engine": "dataset",
                "dataset": "openmathinstruct2",
                "samples": {"math": 2},
            }
        ],
    }
    cfg = FusechatConfig.model_validate(data)
    store = RunStore(cfg.run_dir)
    prompts = run_prompts(cfg, store, log=lambda m: None)
    logs: list[str] = []
    version = run_sample(cfg, store, log=logs.append)
    assert any("answers of prompt source 'openmathinstruct2'" in m for m in logs)
    rows = pq.read_table(version.data).to_pylist()
    answers = read_responses(prompts).to_pylist()
    assert len(rows) == 10 and {r["source"] for r in rows} == {"llama-3.1-405b-instruct"}
    first_two = {(a["prompt_id"], a["text"]) for a in answers if a["response_index"] < 2}
    assert {(r["prompt_id"], r["text"]) for r in rows} == first_two
    assert version.manifest["counts"]["by_source"]["llama-3.1-405b-instruct"]["prompts"] == 5

    with pytest.raises(ValueError, match=r"sources\[0\].dataset: 'nope' is not a prompt source with fields.response"):
        FusechatConfig.model_validate({**data, "sources": [{**data["sources"][0], "dataset": "nope"}]})
    with pytest.raises(ValueError, match="engine: dataset takes `dataset`"):
        FusechatConfig.model_validate({**data, "sources": [{**data["sources"][0], "model": "x"}]})
    no_answers = {**data, "workdir": str(tmp_path / "other")}
    no_answers["prompts"] = {
        "sources": [{**omi2, "fields": {**omi2["fields"], "response": None}}, {**omi2, "name": "b"}]
    }
    # source b reads the same problems, which source a already took (duplicates): it keeps no answer
    no_answers["sources"] = [{**data["sources"][0], "dataset": "b"}]
    cfg = FusechatConfig.model_validate(no_answers)
    run_prompts(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    with pytest.raises(
        UserError, match=r"sources\[0\].dataset \(llama-3.1-405b-instruct\): prompts/v001 holds no answers"
    ):
        run_sample(cfg, RunStore(cfg.run_dir), log=lambda m: None)
