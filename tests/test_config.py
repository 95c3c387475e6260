from pathlib import Path

import pytest
import yaml

from fusechat.config import FusechatConfig, load_config
from fusechat.errors import UserError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
MINIMAL = {
    "name": "t",
    "prompts": {"sources": [{"name": "a", "path": "a.jsonl", "domain": "math", "fields": {"prompt": "q"}}]},
}


def write(tmp_path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name
    assert cfg.prompts.sources


def test_recipes_carry_the_paper_values():
    recipes = {p.stem: load_config(p) for p in CONFIGS if p.stem != "demo"}
    assert set(recipes) >= {"llama-3.1-8b", "qwen-2.5-7b", "gemma-2-9b", "llama-3.2-3b", "llama-3.2-1b"}
    for name, cfg in recipes.items():
        dpo = cfg.dpo.trl_args()
        if name.startswith("llama"):
            assert (dpo["loss_type"], dpo["beta"]) == ("sigmoid_norm", 10.0)
        else:
            assert (dpo["loss_type"], dpo["beta"]) == ("sigmoid", 0.01)
        assert cfg.build.margin == (0.01, 0.1)
        assert cfg.score.reward_model.path == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
        assert cfg.score.reward_model.trust_remote_code is False  # loaded natively (fusechat.score.armorm)
        assert cfg.score.reward_model.max_length == 8192
        assert cfg.sft.trl_args()["num_train_epochs"] == 3
        by_name = {s.name: s for s in cfg.sources}
        assert by_name["gemma-2-27b-it"].k_for("instruction") == 5
        assert by_name["gemma-2-27b-it"].k_for("code") == 8
        assert by_name["qwen2.5-72b-instruct"].sampling.repetition_penalty == 1.05
        assert by_name["qwen2.5-72b-instruct"].k_for("chinese") == 1
        assert cfg.prompts.sft_ratio["instruction"] == 0.4
        code = {s.name: s for s in cfg.prompts.sources if s.domain == "code"}
        assert code["leetcode"].code_tests.model_dump() == {
            "format": "leetcode",
            "solution": "python",
            "verify": True,
            "function_hint": True,
        }
        assert code["self-oss-instruct"].code_tests.format == "self-oss"
        assert code["self-oss-instruct"].code_tests.solution == "response"
        assert cfg.score.routes["code"] == ["reward", "code"] and cfg.build.verified_domains["code"] == "code"
    assert recipes["llama-3.1-8b"].dpo.trl_args()["learning_rate"] == 8e-7
    assert recipes["qwen-2.5-7b"].dpo.trl_args()["learning_rate"] == 3e-7
    assert recipes["gemma-2-9b"].dpo.trl_args()["learning_rate"] == 5e-7
    assert recipes["qwen-2.5-7b"].sft.trl_args()["learning_rate"] == 2e-6


def test_unknown_key_names_path_and_suggests(tmp_path):
    data = {**MINIMAL, "sft": {"learnig_rate": 1e-5}}
    with pytest.raises(UserError, match=r"cfg.yaml: sft.learnig_rate: unknown key .*did you mean learning_rate\?"):
        load_config(write(tmp_path, data))


def test_unknown_nested_key_in_list(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["prompts"]["sources"][0]["feilds"] = data["prompts"]["sources"][0].pop("fields")
    with pytest.raises(UserError, match=r"prompts.sources\[0\].feilds: unknown key; did you mean fields\?"):
        load_config(write(tmp_path, data))


def test_wrong_type_names_key(tmp_path):
    data = {**MINIMAL, "seed": "many"}
    with pytest.raises(UserError, match=r"^.*cfg.yaml: seed: .*integer"):
        load_config(write(tmp_path, data))


def test_missing_required(tmp_path):
    with pytest.raises(UserError, match="prompts: required key missing"):
        load_config(write(tmp_path, {"name": "t"}))


def test_set_overrides_any_key(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["seed=7", "sft.learning_rate=3e-6", "prompts.sources.0.limit=5", "build.margin=[0.0, 1.0]"],
    )
    assert cfg.seed == 7
    assert cfg.sft.trl_args() == {"learning_rate": 3e-6}
    assert cfg.prompts.sources[0].limit == 5
    assert cfg.build.margin == (0.0, 1.0)


def test_set_typo_is_caught(tmp_path):
    with pytest.raises(UserError, match="dpo.bta: unknown key .*did you mean beta"):
        load_config(write(tmp_path, MINIMAL), ["dpo.bta=0.1"])


def test_bad_set_syntax(tmp_path):
    with pytest.raises(UserError, match="expected key.path=value"):
        load_config(write(tmp_path, MINIMAL), ["seed"])


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("name: t\nprompts: [\n")
    with pytest.raises(UserError, match=r"cfg.yaml: line \d+ invalid YAML"):
        load_config(p)


def test_ratio_out_of_range(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["prompts"]["sft_ratio"] = {"math": 1.5}
    with pytest.raises(UserError, match="prompts.sft_ratio: .*between 0 and 1"):
        load_config(write(tmp_path, data))


def test_field_map_needs_exactly_one_prompt_field():
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["prompts"]["sources"][0]["fields"] = {"answer": "a"}
    with pytest.raises(Exception, match="exactly one of prompt"):
        FusechatConfig.model_validate(data)


def test_output_dir_is_managed(tmp_path):
    with pytest.raises(UserError, match="sft.output_dir: set by fusechat"):
        load_config(write(tmp_path, {**MINIMAL, "sft": {"output_dir": "x"}}))


def test_code_tests_are_checked(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["prompts"]["sources"][0]["code_tests"] = {"format": "leetcode", "solution": "python"}
    assert load_config(write(tmp_path, data)).prompts.sources[0].code_tests.verify is True
    data["prompts"]["sources"][0]["code_tests"]["format"] = "humaneval"
    with pytest.raises(UserError, match=r"prompts.sources\[0\].code_tests.format: .*'self-oss' or 'leetcode'"):
        load_config(write(tmp_path, data))
    data["prompts"]["sources"][0]["code_tests"]["format"] = "self-oss"
    data["prompts"]["sources"][0]["fields"]["tests"] = "t"
    with pytest.raises(UserError, match="set fields.tests .* or code_tests .*, not both"):
        load_config(write(tmp_path, data))
    with pytest.raises(UserError, match="score.code.allow_no_isolaton: unknown key; did you mean allow_no_isolation"):
        load_config(write(tmp_path, MINIMAL), ["score.code.allow_no_isolaton=true"])
