"""`fusechat eval`: one model answers every configured benchmark whose file exists, in one `eval/vNNN`:
- local sets (`eval.sets`), greedy, checked here (exact / math / code): `data/results.parquet`, accuracy per set;
- judged benchmarks (`eval.judged`), with the paper's decoding per family: the answer files under `judged/`,
  ready for each harness, and graded by `eval.judge` when one is configured.

One engine (vLLM when installed, else batched generate) serves every benchmark: requests are grouped by their
decoding settings, and MT-Bench's second turns follow its first. A set whose file is missing is skipped with one
line. `evaluate_models` is the one way several models are evaluated (`fusechat run`, the demo).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusechat.config import EvalSet, FusechatConfig, JudgedSet, SamplingParams
from fusechat.errors import UserError
from fusechat.eval.judged import Question, answer_records, read_questions, write_answers
from fusechat.eval.local import accuracy_by_set, check_responses, eval_rows, is_correct
from fusechat.eval.models import answer_model_id, resolve_model
from fusechat.eval.settings import (
    JUDGED,
    JUDGED_MAX_TOKENS,
    cut_at_stops,
    greedy,
    judged_sampling,
    model_family,
    styled,
)
from fusechat.store import RunStore, StageResult, Version, model_identity, run_stage

RESULTS_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("prompt_id", pa.string()),
        ("response", pa.string()),
        ("verdict", pa.string()),
        ("correct", pa.bool_()),
    ]
)
SPLITTER = "\x00fusechat-answer-prefix\x00"  # marks where a prefilled answer starts in the rendered template


@dataclass(frozen=True)
class Present:
    """The configured benchmarks whose files exist, and a line for each one skipped."""

    sets: list[EvalSet] = field(default_factory=list)
    judged: dict[str, JudgedSet] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sets or self.judged)


def present(cfg: FusechatConfig) -> Present:
    """Question files are local paths; nothing is downloaded."""
    out = Present()
    for s in cfg.eval.sets:
        if Path(s.path).expanduser().exists():
            out.sets.append(s)
        else:
            out.skipped.append(f"{s.name}: {s.path}")
    for name in JUDGED:
        spec = getattr(cfg.eval.judged, name)
        if spec is None:
            continue
        if Path(spec.path).expanduser().is_file():
            out.judged[name] = spec
        else:
            out.skipped.append(f"{name}: {spec.path}")
    return out


def configured(cfg: FusechatConfig) -> bool:
    return bool(cfg.eval.sets) or any(getattr(cfg.eval.judged, name) is not None for name in JUDGED)


# --------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Request:
    id: str  # for errors
    messages: list[dict[str, str]]
    sampling: SamplingParams
    prefix: str = ""
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    text: str
    num_tokens: int
    finish_reason: str  # stop, length, or too_long (the prompt fills the context: no answer)


def render(prep, request: Request) -> list[int]:
    """Token ids of the prompt; a prefilled answer start is rendered as the template renders an assistant turn."""
    if not request.prefix:
        return prep.render({"prompt_id": request.id, "messages": request.messages})
    from fusechat.sample.render import with_system

    s = prep.source
    messages = with_system(request.messages, s.system_prompt, s.system_role)
    turn = {"role": "assistant", "content": request.prefix + SPLITTER}
    text = prep.tokenizer.apply_chat_template([*messages, turn], chat_template=prep.template, tokenize=False)
    return prep.tokenizer(text.split(SPLITTER)[0], add_special_tokens=False)["input_ids"]


def generate(prep, engine, requests: list[Request], seed: int) -> list[Answer]:
    """One answer per request; requests sharing decoding settings go to the engine together."""
    ids = [render(prep, r) for r in requests]
    answers: list[Answer | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        if len(ids[i]) >= engine.context_len:
            answers[i] = Answer("", 0, "too_long")
        else:
            groups.setdefault(r.sampling.model_dump_json(), []).append(i)
    for members in groups.values():
        engine.sampling = requests[members[0]].sampling
        for i, out in zip(members, engine.generate([ids[i] for i in members], 1, seed), strict=True):
            c = out[0]
            text, stopped = cut_at_stops(
                prep.tokenizer.decode(c.token_ids, skip_special_tokens=True), requests[i].stops
            )
            reason = "stop" if stopped else c.finish_reason
            answers[i] = Answer(requests[i].prefix + text, len(c.token_ids), reason)
    return answers  # type: ignore[return-value]


def local_requests(rows: list[dict[str, Any]], sets: list[EvalSet], family: str, default_max: int) -> list[Request]:
    budget = {s.name: s.max_new_tokens or default_max for s in sets}
    out = []
    for r in rows:
        st = styled(r["style"], family, r["messages"])
        out.append(Request(r["prompt_id"], st.messages, greedy(budget[r["set"]]), st.prefix, st.stops))
    return out


def judged_requests(benchmark: str, questions: list[Question], spec: JudgedSet, family: str) -> list[Request]:
    """First-turn requests (MT-Bench's later turns are asked once the first answers exist)."""
    return [
        Request(
            f"{benchmark}:{q.id}",
            [{"role": "user", "content": q.turns[0]}],
            judged_sampling(benchmark, family, q.category, spec.max_new_tokens or JUDGED_MAX_TOKENS[benchmark]),
        )
        for q in questions
    ]


def answer_judged(
    prep, engine, questions: dict[str, list[Question]], cfg: FusechatConfig, family: str
) -> dict[str, tuple[list[list[str]], list[list[int]], int]]:
    """Per benchmark: the answer text and token count per turn per question, and how many were cut short."""
    benchmarks = list(questions)
    requests = [r for b in benchmarks for r in judged_requests(b, questions[b], getattr(cfg.eval.judged, b), family)]
    first = iter(generate(prep, engine, requests, cfg.seed))
    history: dict[str, list[list[Answer]]] = {b: [[next(first)] for _ in questions[b]] for b in benchmarks}
    # MT-Bench: each later turn sees the conversation so far.
    qs = questions.get("mt_bench", [])
    spec = cfg.eval.judged.mt_bench
    for turn in range(1, max((len(q.turns) for q in qs), default=1)):
        todo = [i for i, q in enumerate(qs) if len(q.turns) > turn]
        later = []
        for i in todo:
            q, said = qs[i], history["mt_bench"][i]
            messages = []
            for t in range(turn):
                messages += [{"role": "user", "content": q.turns[t]}, {"role": "assistant", "content": said[t].text}]
            messages.append({"role": "user", "content": q.turns[turn]})
            sampling = judged_sampling(
                "mt_bench", family, q.category, spec.max_new_tokens or JUDGED_MAX_TOKENS["mt_bench"]
            )
            later.append(Request(f"mt_bench:{q.id}:{turn + 1}", messages, sampling))
        for i, a in zip(todo, generate(prep, engine, later, cfg.seed + turn), strict=True):
            history["mt_bench"][i].append(a)
    return {
        b: (
            [[a.text for a in turns] for turns in history[b]],
            [[a.num_tokens for a in turns] for turns in history[b]],
            sum(a.finish_reason != "stop" for turns in history[b] for a in turns),
        )
        for b in benchmarks
    }


# --------------------------------------------------------------------------------------------- shell
def run_eval(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    model: str | None = None,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    judge: bool = True,
    log: Callable[[str], None] = print,
    found: Present | None = None,
) -> Version:
    from fusechat.sample.engines import check_engine
    from fusechat.sample.stage import prepare

    pinned = pinned or {}
    if not configured(cfg):
        raise UserError("eval: no benchmarks configured (eval.sets, eval.judged)")
    if found is None:
        found = present(cfg)
        for line in found.skipped:
            log(f"eval: skipped {line} (file not found)")
    if not found:
        raise UserError("eval: none of the configured benchmark files exists (see eval.sets, eval.judged)")
    label, runner, inputs = resolve_model(cfg, store, model, pinned)
    if cfg.eval.engine == "auto" and runner.engine == "vllm":
        try:
            check_engine(runner, "eval")
        except UserError as e:
            log(f"eval: generate instead of vllm ({e})")
            runner = runner.model_copy(update={"engine": "transformers"})
    family = cfg.eval.family or model_family(runner.model)
    if family is None:
        log(f"eval: family of {runner.model} unknown: the llama decoding settings (set eval.family)")
        family = "llama"
    model_id = answer_model_id(cfg, label)
    rows = eval_rows(found.sets, [cfg.eval.sets.index(s) for s in found.sets]) if found.sets else []
    questions = {b: read_questions(b, spec.path, spec.limit, f"eval.judged.{b}") for b, spec in found.judged.items()}
    probe = rows[0] if rows else {"prompt_id": "probe", "messages": [{"role": "user", "content": "hello"}]}
    prep = prepare(runner, "eval", probe)
    config = {
        "eval": cfg.eval.model_dump(mode="json", exclude={"judge"}),
        "files": {p: model_identity(p) for p in [s.path for s in found.sets] + [j.path for j in found.judged.values()]},
        "model": label,
        "model_id": model_id,
        "family": family,
        "runner": runner.model_dump(mode="json"),
        "identity": model_identity(runner.model),
        "seed": cfg.seed,
        "score": cfg.score.code.model_dump(mode="json"),
    }

    def body(out: Path) -> StageResult:
        import pyarrow.parquet as pq

        from fusechat.sample.engines import open_engine

        started = time.time()
        n_judged = sum(len(q) for q in questions.values())
        log(f"eval {label}: {len(rows)} local prompts, {n_judged} judged questions ({runner.engine}, {family})")
        engine = open_engine(runner, prep.stop_ids, prep.pad_id)
        try:
            local = generate(prep, engine, local_requests(rows, found.sets, family, cfg.eval.max_new_tokens), cfg.seed)
            judged = answer_judged(prep, engine, questions, cfg, family) if questions else {}
        finally:
            engine.close()
        generate_s = time.time() - started
        counts: dict[str, Any] = {"model": label, "model_id": model_id, "family": family, "engine": runner.engine}
        if rows:
            responses = [a.text for a in local]
            verdicts = check_responses(rows, responses, cfg)
            (out / "data").mkdir()
            table = pa.Table.from_pylist(
                [
                    {
                        "set": r["set"],
                        "prompt_id": r["prompt_id"],
                        "response": t,
                        "verdict": v,
                        "correct": is_correct(v),
                    }
                    for r, t, v in zip(rows, responses, verdicts, strict=True)
                ],
                schema=RESULTS_SCHEMA,
            )
            pq.write_table(table, out / "data" / "results.parquet")
            acc = accuracy_by_set(rows, verdicts)
            mean = round(sum(acc.values()) / len(acc), 4)
            log(f"  {label}: " + ", ".join(f"{k}={v:.2f}" for k, v in acc.items()) + f", mean={mean:.2f}")
            counts.update(prompts=len(rows), accuracy=acc, mean_accuracy=mean)
        else:
            counts.update(prompts=0, accuracy={})
        counts["judged"] = {}
        stamp = time.time()
        for b, (texts, tokens, cut) in judged.items():
            records = answer_records(b, questions[b], texts, tokens, model_id, stamp)
            path = write_answers(out / "judged" / b, b, records, model_id)
            counts["judged"][b] = {"file": str(path.relative_to(out)), "answers": len(records), "cut_short": cut}
            log(f"  {b}: {len(records)} answers -> {path.relative_to(out)}" + (f" ({cut} cut short)" if cut else ""))
        counts["skipped"] = found.skipped
        return StageResult(counts=counts, timings={"generate_s": round(generate_s, 3)})

    version = run_stage(store, "eval", config, inputs, body, force=force, job=f"model-{label}", log=log)
    assert version is not None
    if judge and cfg.eval.judge is not None:
        from fusechat.eval.judge import run_judge

        run_judge(cfg, version, log=log)
    return version


def fusion_models(cfg: FusechatConfig) -> list[str]:
    """The target before fusion, after SFT, after DPO."""
    return (["target"] if cfg.target is not None else []) + ["sft", "dpo"]


def evaluate_models(
    cfg: FusechatConfig, store: RunStore, models: list[str], *, log: Callable[[str], None] = print
) -> dict[str, Version]:
    """Evaluate each model (names as for `--model`); {} with one line per missing file when none exists."""
    found = present(cfg)
    for line in found.skipped:
        log(f"eval: skipped {line} (file not found)")
    if not found:
        log("eval: skipped (none of the configured benchmark files exists)")
        return {}
    return {m: run_eval(cfg, store, model=m, log=log, found=found) for m in models}
