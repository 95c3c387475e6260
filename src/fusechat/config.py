"""The YAML config: one pydantic schema for the whole file, `--set` overrides, one-line errors.

Every section forbids unknown keys, and a key written twice in one mapping is an error. `sft:` and `dpo:` hold
fusechat's own training keys (lora, launch) plus any field of TRL's `SFTConfig` / `DPOConfig`; those are checked
against TRL's dataclass fields, their types and the ranges TRL and transformers need, so that a typo or a bad
value fails before a model loads.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fusechat.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- prompts
class FieldMap(Section):
    """Which columns of a prompt dataset hold what. `prompt` may list several columns (joined by a blank line,
    empty ones skipped), e.g. alpaca's `[instruction, input]`. Dotted paths reach into nested values
    (`conversations.0.value`)."""

    prompt: str | list[str] | None = None
    messages: str | None = None
    system: str | None = None
    answer: str | None = None
    tests: str | None = None
    # A column of existing answers (e.g. OpenMathInstruct-2's generated_solution): kept per prompt (up to the
    # source's max_responses) for a `sources[]` entry with `engine: dataset`
    response: str | None = None
    # The prompt text holds several turns, each after its role's marker, e.g. HelpSteer2's
    # {user: "<extra_id_1>User", assistant: "<extra_id_1>Assistant"}; the text before the first marker is a user turn
    turn_markers: dict[Literal["user", "assistant", "system"], str] | None = None

    @model_validator(mode="after")
    def _one_prompt_field(self) -> FieldMap:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("set exactly one of prompt (text column) or messages (chat column)")
        if self.turn_markers is not None and (self.prompt is None or not all(self.turn_markers.values())):
            raise ValueError("turn_markers split a prompt text column: set prompt, and a non-empty marker per role")
        return self


class CodeTestsConfig(Section):
    """Runnable tests for the prompts of a code dataset, made at ingest (`fusechat.code_tests`): `self-oss`
    takes the tests section of the `solution` column (bigcode/self-oss-instruct-sc2: `response`); `leetcode`
    turns the problem text's Input/Output examples into asserts calling the function the `solution` column
    (greengerong/leetcode: `python`) defines."""

    format: Literal["self-oss", "leetcode"]
    solution: str  # column holding the dataset's own solution (dotted paths reach nested values)
    verify: bool = True  # run the tests against that solution in the sandbox; prompts it fails are dropped
    function_hint: bool = True  # end the prompt with the names the tests call when the prompt does not say them


class PromptSource(Section):
    name: str
    path: str  # hub dataset id, local dataset dir, or a .jsonl/.json/.parquet file
    domain: str
    fields: FieldMap
    code_tests: CodeTestsConfig | None = None
    subset: str | None = None  # hub dataset config name
    split: str = "train"
    revision: str | None = None
    limit: int | None = Field(default=None, ge=1)  # a seeded random sample of this many prompts
    stratify: str | None = None  # limit: each value of this column gets its proportional share (e.g. source)
    sft_ratio: float | None = Field(default=None, ge=0.0, le=1.0)  # overrides prompts.sft_ratio[domain]
    exclude: dict[str, list[Any]] = {}  # drop rows whose column value is listed, e.g. task_category: [Math]
    exclude_topics: list[Literal["code", "math"]] = []  # drop prompts fusechat.topics' rule puts in these topics
    max_responses: int = Field(default=8, ge=1)  # fields.response: answers kept per prompt

    @field_validator("stratify")
    @classmethod
    def _stratify_a_limit(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and (not v.strip() or info.data.get("limit") is None):
            raise ValueError("splits a `limit` by this column: set limit, and a column name")
        return v

    @field_validator("max_responses")
    @classmethod
    def _responses_mapped(cls, v: int, info: ValidationInfo) -> int:
        fields = info.data.get("fields")
        if fields is not None and fields.response is None and v != cls.model_fields["max_responses"].default:
            raise ValueError("counts the answers of fields.response, which is not set")
        return v

    @model_validator(mode="after")
    def _one_source_of_tests(self) -> PromptSource:
        if self.code_tests is not None and self.fields.tests is not None:
            raise ValueError(
                "set fields.tests (a column of ready tests) or code_tests (tests made at ingest), not both"
            )
        return self


class PromptsConfig(Section):
    sources: list[PromptSource]
    sft_ratio: dict[str, float] = {}  # domain -> fraction of prompts in the sft split (rest: dpo)
    default_sft_ratio: float = Field(default=0.4, ge=0.0, le=1.0)

    @field_validator("sft_ratio")
    @classmethod
    def _ratios_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for domain, r in v.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio for {domain!r} must be between 0 and 1, got {r}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> PromptsConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source name(s): {', '.join(dup)}")
        return self

    def ratio_for(self, source: PromptSource) -> float:
        if source.sft_ratio is not None:
            return source.sft_ratio
        return self.sft_ratio.get(source.domain, self.default_sft_ratio)


# --------------------------------------------------------------------------------------------- sources
class SamplingParams(Section):
    temperature: float = Field(default=0.8, ge=0.0)  # 0: greedy (k identical samples)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)  # -1 (or 0): no top-k cut
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    max_tokens: int = Field(default=4096, ge=1)
    seed: int | None = Field(default=None, ge=0)  # default: the config's seed


class SourceModel(Section):
    name: str
    model: str | None = None  # local dir or hub id (none for engine: dataset)
    # dataset: no model; the answers that prompt source `dataset` kept from its fields.response column
    engine: Literal["vllm", "transformers", "dataset"] = "vllm"
    dataset: str | None = None
    engine_args: dict[str, Any] = {}  # passed to vllm.LLM (tensor_parallel_size, max_model_len, dtype, ...)
    sampling: SamplingParams = SamplingParams()
    samples: dict[str, Annotated[int, Field(ge=0)]] = {}  # domain -> k; a domain not listed gets default_samples
    default_samples: int = Field(default=0, ge=0)
    chat_template: str | None = None  # a .jinja file or an inline template; overrides the tokenizer's
    system_prompt: str | None = None
    system_role: Literal["keep", "merge", "drop"] = "keep"  # Gemma-2 rejects system turns: merge into user
    batch_size: int = Field(default=64, ge=1)  # transformers engine: prompts per generate call
    # prompts per resumable chunk (one Parquet file each), large enough that a vLLM replica seldom waits on a chunk's
    # slowest 4,096-token sample (see README "Sampling on GPUs")
    chunk_size: int = Field(default=1024, ge=1)
    # engine copies on this job's GPUs, each on tensor_parallel_size x pipeline_parallel_size of them; default: as many
    # as fit on GPUs, one (in this process) on CPU. Placement only, same samples at any count: left out of model_dump,
    # so of fingerprints and manifests.
    replicas: int | None = Field(default=None, ge=1, exclude=True)

    def k_for(self, domain: str) -> int:
        return self.samples.get(domain, self.default_samples)

    @field_validator(
        "engine_args", "sampling", "chat_template", "system_prompt", "system_role", "batch_size", "replicas"
    )
    @classmethod
    def _a_model_setting(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("engine") == "dataset" and v != cls.model_fields[info.field_name].default:
            raise ValueError("engine: dataset loads no model, so this setting does nothing; remove it")
        return v

    @model_validator(mode="after")
    def _model_or_dataset(self) -> SourceModel:
        if self.engine == "dataset":
            if self.dataset is None or self.model is not None:
                raise ValueError("engine: dataset takes `dataset` (a prompt source with fields.response), no model")
        elif self.model is None or self.dataset is not None:
            raise ValueError(f"engine: {self.engine} takes `model` (a local directory or hub id), no dataset")
        return self


# --------------------------------------------------------------------------------------------- score
class RewardModelConfig(Section):
    path: str
    trust_remote_code: bool = False  # not needed for the ArmoRM layout, which fusechat loads natively
    batch_tokens: int = Field(default=65536, ge=1)  # padded tokens per forward pass (halved on out-of-memory)
    batch_size: int = Field(default=256, ge=1)  # most rows per forward pass
    max_length: int = Field(default=4096, ge=8)  # longer conversations lose the response's tail, never the prompt
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    head_dtype: Literal["float32", "model"] = "float32"  # the reward head; model: the backbone's dtype
    chat_template: str | None = None
    # right: pads after the text, which every pooling rule handles (a remote-code head may need it)
    padding_side: Literal["right", "left"] = "right"
    workers: int | None = Field(default=None, ge=1)  # scoring processes on this machine; default one per GPU


class MathVerifierConfig(Section):
    timeout_s: float = Field(default=5.0, gt=0)
    workers: int = Field(default=2, ge=1)


class CodeVerifierConfig(Section):
    timeout_s: float = Field(default=10.0, gt=0)
    memory_mb: int = Field(default=1024, ge=64)
    max_processes: int = Field(default=16, ge=1)
    workers: int = Field(default=4, ge=1)
    python: str | None = None  # interpreter for the sandbox; default: the one running fusechat
    # Where the machine offers no isolation (no user namespaces, not root with CAP_SYS_ADMIN), code checks are
    # refused; true accepts running model-written code with resource limits only.
    allow_no_isolation: bool = False


class ScoreConfig(Section):
    reward_model: RewardModelConfig | None = None
    routes: dict[str, list[Literal["reward", "math", "code", "exact"]]] = {}  # domain -> scorers
    default_route: list[Literal["reward", "math", "code", "exact"]] = ["reward"]
    math: MathVerifierConfig = MathVerifierConfig()
    code: CodeVerifierConfig = CodeVerifierConfig()
    shard_size: int = Field(default=2048, ge=1)


# --------------------------------------------------------------------------------------------- build
class BuildConfig(Section):
    margin: tuple[float, float] = (0.01, 0.1)  # DPO reward gap band [low, high] (ArmoRM scale in the paper)
    sft_only_domains: list[str] = []
    verified_domains: dict[str, Literal["math", "code", "exact"]] = {}  # domain -> which verdict gates acceptance
    drop_truncated: bool = True
    drop_empty: bool = True
    max_length: int | None = Field(default=2048, ge=1)  # prompt + response tokens of the target tokenizer
    # a candidate over max_length: exclude (the next-best acceptable response wins) or truncate (it competes whole
    # and is cut to fit when selected, as the paper's trainer did)
    over_length: Literal["exclude", "truncate"] = "exclude"
    pairs_per_prompt: int = Field(default=1, ge=1)

    @field_validator("over_length")
    @classmethod
    def _a_length_to_cut_to(cls, v: str, info: ValidationInfo) -> str:
        if v == "truncate" and "max_length" in info.data and info.data["max_length"] is None:
            raise ValueError("truncate cuts to build.max_length, which is null (no length filter)")
        return v

    pair_source_rule: Literal["largest_margin", "highest_chosen", "random"] = "largest_margin"

    @field_validator("margin")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError("expected [low, high] with 0 <= low <= high")
        return v


# --------------------------------------------------------------------------------------------- target / train
class TargetConfig(Section):
    path: str
    chat_template: str | None = None  # a .jinja file or an inline template; overrides the tokenizer's


class LoraConfig(Section):
    r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    merge: bool = True  # merge into the base weights when saving; False keeps an adapter


class TrainConfig(BaseModel):
    """fusechat's keys; every other key is a TRL config field (checked against TRL by `check_trl_keys`)."""

    model_config = ConfigDict(extra="allow")
    lora: LoraConfig | None = None
    num_processes: int = Field(default=1, ge=1)
    accelerate_config: str | None = None  # a file, or a name shipped with fusechat: ddp, zero3, fsdp
    model: str | None = None  # dpo: start from this instead of the latest sft version
    # Examples per optimizer step over all processes; per-device batch x accumulation are derived for the world size
    global_batch_size: int | None = Field(default=None, ge=1)
    # Keep every `save_steps` checkpoint's model in the version (checkpoints/step-N); default: dpo yes, sft no
    keep_checkpoints: bool | None = None

    def trl_args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# --------------------------------------------------------------------------------------------- eval
class EvalSet(Section):
    """A benchmark scored locally from a local file (skipped with one line when the file is missing)."""

    name: str
    path: str
    domain: str
    fields: FieldMap
    check: Literal["exact", "math", "code"] = "exact"
    limit: int | None = Field(default=None, ge=1)
    # The paper's harness prompt: math_cot (Qwen2.5-Math eval, answer in \boxed{}), evalplus (EvalPlus chat prompt)
    style: Literal["plain", "math_cot", "evalplus"] = "plain"
    entry_point: str | None = None  # code: column naming the function HumanEval's check(candidate) is called with
    test_setup: str | None = None  # code: column with code run before the tests (MBPP's test_imports)
    max_new_tokens: int | None = Field(default=None, ge=1)  # default: eval.max_new_tokens


class JudgedSet(Section):
    """A judged benchmark's question file, in its harness's layout; the answer file is written for that harness."""

    path: str
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)  # default: the paper's (4096; MT-Bench 1024)


class ArenaHardSet(JudgedSet):
    baseline: str | None = None  # judge step: the baseline's answer file (v0.1: model_answer/gpt-4-0314.jsonl)


class MTBenchSet(JudgedSet):
    judge_prompts: str | None = None  # judge step: FastChat's data/judge_prompts.jsonl
    references: str | None = None  # judge step: FastChat's data/mt_bench/reference_answer/gpt-4.jsonl


class AlignBenchSet(JudgedSet):
    config_dir: str | None = None  # judge step: AlignBench's config/ (dimension_set.json, ...)


class JudgedBenchmarks(Section):
    alpaca_eval: JudgedSet | None = None
    arena_hard: ArenaHardSet | None = None
    mt_bench: MTBenchSet | None = None
    alignbench: AlignBenchSet | None = None


class JudgeConfig(Section):
    """An OpenAI-compatible chat-completions endpoint (e.g. a judge model served locally). The key is read from
    the environment variable named here at request time and never written anywhere."""

    base_url: str  # e.g. http://localhost:8000/v1
    model: str
    api_key_env: str | None = None
    parallel: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=300.0, gt=0)


class EvalConfig(Section):
    sets: list[EvalSet] = []
    judged: JudgedBenchmarks = JudgedBenchmarks()
    judge: JudgeConfig | None = None  # the optional judge step; never runs unless configured
    family: Literal["llama", "qwen", "gemma"] | None = None  # decoding presets; default: from the model
    max_new_tokens: int = Field(default=512, ge=1)
    batch_size: int = Field(default=32, ge=1)
    engine: Literal["auto", "vllm", "transformers"] = "auto"  # auto: vllm when installed and able, else generate
    engine_args: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------- root
class FusechatConfig(Section):
    name: str
    workdir: str = "runs"
    seed: int = Field(default=42, ge=0)
    prompts: PromptsConfig
    sources: list[SourceModel] = []
    score: ScoreConfig = ScoreConfig()
    build: BuildConfig = BuildConfig()
    target: TargetConfig | None = None
    sft: TrainConfig = TrainConfig()
    dpo: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_dirname(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain directory name")
        return v

    @model_validator(mode="after")
    def _unique_source_names(self) -> FusechatConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source name(s): {', '.join(dup)}")
        answered = {p.name: p for p in self.prompts.sources if p.fields.response}
        for i, s in enumerate(self.sources):
            if s.dataset is not None and s.dataset not in answered:
                raise ValueError(
                    f"sources[{i}].dataset: {s.dataset!r} is not a prompt source with fields.response "
                    f"({', '.join(answered) or 'none has one'})"
                )
            if s.dataset is not None and s.k_for(answered[s.dataset].domain) == 0:
                domain = answered[s.dataset].domain
                raise ValueError(
                    f"sources[{i}].samples: 0 for domain {domain!r}, the domain of prompt source {s.dataset!r}: "
                    f"{s.name} would take none of its answers"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.name


# --------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any):
        self.problem = f"key {key!r} appears twice in one mapping (the second would silently win)"
        self.problem_mark = mark


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise DuplicateKey(key, key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: _mapping_without_duplicates(loader, node, deep=True),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key.path=value")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = _child(node, part)
        if nxt is None:
            nxt = {}
            _set_child(node, part, nxt)
        elif not isinstance(nxt, dict | list):
            raise UserError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = nxt
    _set_child(node, path[-1], value)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _set_child(node: Any, part: str, value: Any) -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise UserError(f"--set: list index {part!r} out of range")
        node[int(part)] = value
    else:
        node[part] = value


def load_config(path: str | Path, overrides: list[str] | None = None, check_trl: bool = True) -> FusechatConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    try:
        cfg = FusechatConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{path}: {describe_validation_error(e, data)}") from None
    if check_trl:
        for section in ("sft", "dpo"):
            err = check_trl_keys(section, getattr(cfg, section).trl_args())
            if err:
                raise UserError(f"{path}: {err}")
    return cfg


def describe_validation_error(e: ValidationError, data: dict[str, Any]) -> str:
    """The first error as `key.path: what is wrong`, with a did-you-mean for unknown keys. A typo yields both an
    unknown key and a missing one: report the unknown key, which is the cause."""
    err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = [str(p) for p in err["loc"]]
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_fields(FusechatConfig, loc[:-1], data)
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        return f"{where}: unknown key" + (
            f"; did you mean {hint[0]}?" if hint else f"; expected one of: {', '.join(sorted(known))}"
        )
    if err["type"] == "missing":
        return f"{where}: required key missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return msg
    if "input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict):
        return f"{where}: {msg} (got {json.dumps(err['input'], default=str)[:80]})"
    return f"{where}: {msg}"


def _known_fields(model: type[BaseModel], loc: list[str], data: Any) -> list[str]:
    """Field names of the sub-model reached by `loc` (list indices skipped)."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------- TRL keys
def trl_fields(section: str) -> dict[str, list[str]]:
    """Field names of TRL's SFTConfig / DPOConfig, each with the kinds of YAML value its type accepts (`bool`,
    `int`, `float`, `str`, `list`, `dict`, `null`; `any` when it cannot be told). Importing TRL costs seconds, so
    they are cached per installed (trl, transformers) version."""
    from importlib.metadata import version

    key = f"trl-{version('trl')}-transformers-{version('transformers')}-kinds"
    cache = Path.home() / ".cache" / "fusechat" / f"{key}.json"
    try:
        return dict(json.loads(cache.read_text())[section])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import dataclasses
    import typing

    from trl import DPOConfig, SFTConfig

    fields = {}
    for name, cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        hints = typing.get_type_hints(cls)
        fields[name] = {f.name: sorted(_kinds(hints.get(f.name, Any))) for f in dataclasses.fields(cls)}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{id(fields)}")
        tmp.write_text(json.dumps(fields))
        tmp.replace(cache)
    except OSError:
        pass
    return fields[section]


def _kinds(annotation: Any) -> set[str]:
    """The YAML value kinds a dataclass field's type accepts (an enum takes its string values)."""
    import enum
    import typing

    if annotation is type(None) or annotation is None:
        return {"null"}
    if annotation in (bool, int, float, str):
        return {annotation.__name__}
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        return {"list"}
    if origin is dict or annotation is dict:
        return {"dict"}
    if annotation is list:
        return {"list"}
    if origin is typing.Literal:
        return {type(a).__name__ if a is not None else "null" for a in typing.get_args(annotation)}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"str"}
    args = typing.get_args(annotation)
    if args and origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_kinds(a) for a in args))
    return {"any"}


# Set by fusechat itself per stage (output dir, hardware); a user value would be overwritten silently.
MANAGED_TRL_KEYS = {"output_dir"}
# Ranges TRL and transformers need but do not check (or check only once training has started): (low, high,
# whether low is allowed). `max_steps` is -1 (train by epochs) or a step count.
TRL_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "learning_rate": (0, None, True),
    "num_train_epochs": (0, None, False),
    "per_device_train_batch_size": (1, None, True),
    "per_device_eval_batch_size": (1, None, True),
    "gradient_accumulation_steps": (1, None, True),
    "warmup_ratio": (0, 1, True),
    "warmup_steps": (0, None, True),
    "weight_decay": (0, None, True),
    "max_grad_norm": (0, None, True),
    "adam_beta1": (0, 1, True),
    "adam_beta2": (0, 1, True),
    "adam_epsilon": (0, None, False),
    "logging_steps": (0, None, False),
    "save_steps": (0, None, False),
    "eval_steps": (0, None, False),
    "save_total_limit": (1, None, True),
    "seed": (0, None, True),
    "dataloader_num_workers": (0, None, True),
    "max_length": (1, None, True),
    "beta": (0, None, False),
    "label_smoothing": (0, 0.5, True),
}
# Fields TRL also accepts in a form their type does not say (DPO wraps a single loss type in a list).
EXTRA_KINDS = {"loss_type": {"str"}}
KIND_NAMES = {
    "bool": "true/false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "null": "null",
}


def check_trl_keys(section: str, args: dict[str, Any]) -> str | None:
    if not args:
        return None
    fields = trl_fields(section)
    own = set(TrainConfig.model_fields)
    for key, value in args.items():
        if key in MANAGED_TRL_KEYS:
            return f"{section}.{key}: set by fusechat (the stage's version directory); remove it"
        if key not in fields:
            hint = difflib.get_close_matches(key, sorted(set(fields) | own), n=1)
            kind = "SFTConfig" if section == "sft" else "DPOConfig"
            return f"{section}.{key}: unknown key (not a field of TRL's {kind})" + (
                f"; did you mean {hint[0]}?" if hint else ""
            )
        if value is False and key.endswith("_strategy"):
            continue  # YAML 1.1 reads an unquoted `no` as false; the training stage passes "no" to TRL
        problem = _value_problem(key, value, set(fields[key]) | EXTRA_KINDS.get(key, set()))
        if problem:
            return f"{section}.{key}: {problem} (got {json.dumps(value, default=str)[:60]})"
    return None


def _value_problem(key: str, value: Any, kinds: set[str]) -> str | None:
    """What is wrong with a TRL value: its kind (a learning rate `abc`), or its range (`max_steps: -5`)."""
    if "any" in kinds:
        return None
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(type(value))
    if value is None:
        kind = "null"
    ok = kind in kinds or (kind == "int" and "float" in kinds)
    if not ok:
        wanted = [KIND_NAMES[k] for k in ("bool", "int", "float", "str", "list", "dict", "null") if k in kinds]
        return "expected " + " or ".join(wanted)
    if kind not in ("int", "float"):
        return None
    if key == "max_steps" and not (value == -1 or value >= 1):
        return "expected -1 (train by num_train_epochs) or a number of steps >= 1"
    if key in TRL_RANGES:
        low, high, inclusive = TRL_RANGES[key]
        if value < low or (value == low and not inclusive) or (high is not None and value > high):
            op = ">=" if inclusive else ">"
            return f"expected {op} {low}" + (f" and <= {high}" if high is not None else "")
    return None
