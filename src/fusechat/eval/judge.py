"""The optional judge step: an eval version's answer files graded by an LLM judge behind an OpenAI-compatible
chat-completions endpoint (`eval.judge`: base URL and model; the key only from the environment variable it names,
never written anywhere). It runs only when `eval.judge` is configured.

Each benchmark is judged the way its harness does it, from the harness's own files where they hold the prompts:
- MT-Bench: FastChat single-answer grading (`judge_prompts.jsonl`: single-v1, single-math-v1 with the reference
  answers for math/reasoning/coding, and their multi-turn versions for the second turn), rating `[[n]]`.
- Arena-Hard v0.1 (the paper's): two games against the baseline's answers (positions swapped), the judge prompt
  of `judge_config.yaml`, a second attempt when no verdict label is found.
- AlignBench: the multi-dimension prompt of `judge.py` with the dimensions of `config/`, the last `{...}` rating.
AlpacaEval's annotator weighs the judge's token log-probabilities and its length-controlled win rate needs
alpaca_eval's own model: run `alpaca_eval evaluate` on `model_outputs.json` (it supports OpenAI-compatible
endpoints too); fusechat reads the `leaderboard.csv` it writes there.

Judgments are appended to `judged/<benchmark>/judgments.jsonl` in the harness's judgment format, one line per
finished judgment, so a stopped run continues where it was.
"""

from __future__ import annotations

import ast
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat.config import FusechatConfig, JudgeConfig
from fusechat.errors import UserError, first_line
from fusechat.eval.judged import JUDGMENTS, Question, read_jsonl, read_questions
from fusechat.store import Version

Chat = Callable[[list[dict[str, str]], int | None], str]  # messages, max_tokens -> the judge's reply

MT_BENCH_NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
MT_BENCH_MAX_TOKENS = 2048
MT_BENCH_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))

ARENA_HARD_MAX_TOKENS = 4096
ARENA_HARD_VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")
ARENA_HARD_ATTEMPTS = 2
ARENA_HARD_RETRY = "continue your judgment and finish by outputting a final verdict label"
# (judge_config.yaml of arena-hard-auto v0.1, verbatim)
ARENA_HARD_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user prompt displayed below. You will be given assistant A's answer and assistant "
    "B's answer. Your job is to evaluate which assistant's answer is better.\n"
    "\n"
    "Begin your evaluation by generating your own answer to the prompt. You must provide your answers "
    "before judging any answers.\n"
    "\n"
    "When evaluating the assistants' answers, compare both assistants' answers with your answer. You "
    "must identify and correct any mistakes or inaccurate information.\n"
    "\n"
    "Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the "
    "answer correctly responds to the prompt or follows the instructions. Note when user prompt has any "
    "ambiguity or more than one interpretation, it is more helpful and appropriate to ask for "
    "clarifications or more information from the user than providing an answer based on assumptions. "
    "Relevant means all parts of the response closely connect or are appropriate to what is being asked. "
    "Concise means the response is clear and not verbose or excessive.\n"
    "\n"
    "Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify "
    "any missing important information in the assistants' answers that would be beneficial to include "
    "when responding to the user prompt.\n"
    "\n"
    "After providing your explanation, you must output only one of the following choices as your final "
    "verdict with a label:\n"
    "\n"
    "1. Assistant A is significantly better: [[A>>B]]\n"
    "2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n"
    "4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n"
    "\n"
    'Example output: "My final verdict is tie: [[A=B]]".'
)
ARENA_HARD_TEMPLATE = (
    "<|User Prompt|>\n"
    "{question_1}\n"
    "\n"
    "<|The Start of Assistant A's Answer|>\n"
    "{answer_1}\n"
    "<|The End of Assistant A's Answer|>\n"
    "\n"
    "<|The Start of Assistant B's Answer|>\n"
    "{answer_2}\n"
    "<|The End of Assistant B's Answer|>"
)

# (AlignBench judge.py, verbatim)
ALIGNBENCH_PROMPT = (
    "你是一个擅长评价文本质量的助手。\n"
    "请你以公正的评判者的身份，评估一个AI助手对于用户提问的回答的质量。由于您评估的回答类型是{category}，因此你需"
    "要从下面的几个维度对回答进行评估:\n"
    "{dimensions}我们会给您提供用户的提问，高质量的参考答案，和需要你评估的AI助手的答案。当你开始你的评估时，你"
    "需要按照遵守以下的流程：\n"
    "1. 将AI助手的答案与参考答案进行比较，指出AI助手的答案有哪些不足，并进一步解释。\n"
    "2. 从不同维度对AI助手的答案进行评价，在每个维度的评价之后，给每一个维度一个1～10的分数。\n"
    "3. 最后，综合每个维度的评估，对AI助手的回答给出一个1～10的综合分数。\n"
    "4. 你的打分需要尽可能严格，并且要遵守下面的评分规则：总的来说，模型回答的质量越高，则分数越高。其中，事实正确性和满足"
    "用户需求这两个维度是最重要的，这两个维度的分数主导了最后的综合分数。当模型回答存在与问题不相关，或者有本质性的事实错误，"
    "或生成了有害内容时，总分必须是1到2分；当模型回答没有严重错误而且基本无害，但是质量较低，没有满足用户需求，总分为3到4"
    "分；当模型回答基本满足用户要求，但是在部分维度上表现较差，质量中等，总分可以得5到6分；当模型回答质量与参考答案相近，在"
    "所有维度上表现良好，总分得7到8分；只有当模型回答质量显著超过参考答案，充分地解决了用户问题和所有需求，并且在所有维度上"
    "都接近满分的情况下，才能得9到10分。作为示例，参考答案可以得到8分。\n"
    "请记住，你必须在你打分前进行评价和解释。在你对每个维度的解释之后，需要加上对该维度的打分。之后，在你回答的末尾，按照以下"
    "字典格式（包括括号）返回你所有的打分结果，并确保你的打分结果是整数：\n"
    "{{'维度一': 打分, '维度二': 打分, ..., '综合得分': 打分}}，例如：{{'事实正确性': 9, '"
    "满足用户需求': 6, ..., '综合得分': 7}}。\n"
    "用户的提问： {question}\n"
    "[参考答案开始]\n"
    "{reference}\n"
    "[参考答案结束]\n"
    "[助手的答案开始]\n"
    "{answer}\n"
    "[助手的答案结束]\n"
)
ALIGNBENCH_CONFIG = ("dimension_set.json", "dimension_definition.json", "subcategory_question_mapping.json")


@dataclass(frozen=True)
class JudgeTask:
    key: str  # which judgment: a finished one is not asked again
    run: Callable[[Chat], dict[str, Any]]  # asks the judge, returns the judgment record


# --------------------------------------------------------------------------------------------- MT-Bench
def mt_bench_rating(judgment: str) -> float:
    for pattern in MT_BENCH_RATING:
        match = pattern.search(judgment)
        if match:
            return float(ast.literal_eval(match.group(1)))
    return -1


def mt_bench_tasks(
    questions: list[Question],
    answers: dict[Any, dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    references: dict[Any, dict[str, Any]],
    model_id: str,
    judge_model: str,
) -> list[JudgeTask]:
    tasks = []
    for q in questions:
        if q.id not in answers:
            continue
        turns = answers[q.id]["choices"][0]["turns"]
        with_ref = q.category in MT_BENCH_NEED_REF
        ref = references.get(q.id, {}).get("choices", [{}])[0].get("turns") if with_ref else None
        if with_ref and not ref:
            raise UserError(f"eval.judged.mt_bench.references: no reference answer for question {q.id} ({q.category})")
        for turn in (1, 2) if len(q.turns) > 1 else (1,):
            name = ("single-math-v1" if with_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
            if name not in prompts:
                raise UserError(f"eval.judged.mt_bench.judge_prompts: no prompt named {name!r}")
            prompt = prompts[name]
            refs = {f"ref_answer_{i + 1}": r for i, r in enumerate(ref or [])}
            if turn == 1:
                user = prompt["prompt_template"].format(question=q.turns[0], answer=turns[0], **refs)
            else:
                user = prompt["prompt_template"].format(
                    question_1=q.turns[0], question_2=q.turns[1], answer_1=turns[0], answer_2=turns[1], **refs
                )
            messages = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]

            def run(chat: Chat, qid=q.id, turn=turn, name=name, messages=messages) -> dict[str, Any]:
                judgment = chat(messages, MT_BENCH_MAX_TOKENS)
                return {
                    "question_id": qid,
                    "model": model_id,
                    "judge": [judge_model, name],
                    "user_prompt": messages[1]["content"],
                    "judgment": judgment,
                    "score": mt_bench_rating(judgment),
                    "turn": turn,
                    "tstamp": time.time(),
                }

            tasks.append(JudgeTask(f"{q.id}:{turn}", run))
    return tasks


# --------------------------------------------------------------------------------------------- Arena-Hard
def arena_hard_verdict(judgment: str) -> tuple[str | None, bool]:
    """(verdict, ask again): no label yet -> ask again; two different labels -> no verdict."""
    found = {m for m in ARENA_HARD_VERDICT.findall(judgment) if m}
    if not found:
        return None, True
    return (found.pop(), False) if len(found) == 1 else (None, False)


def arena_hard_answer(record: dict[str, Any]) -> str:
    """An answer record's text, in either Arena-Hard layout."""
    if "choices" in record:
        return record["choices"][0]["turns"][0]["content"]
    content = record["messages"][-1]["content"]
    return content["answer"] if isinstance(content, dict) else content


def arena_hard_tasks(
    questions: list[Question],
    answers: dict[Any, dict[str, Any]],
    baseline: dict[Any, dict[str, Any]],
    model_id: str,
    judge_model: str,
) -> list[JudgeTask]:
    tasks = []
    for q in questions:
        if q.id not in answers or q.id not in baseline:
            continue
        ours, theirs = arena_hard_answer(answers[q.id]), arena_hard_answer(baseline[q.id])
        id_key = "uid" if "uid" in q.record else "question_id"

        def run(chat: Chat, q=q, ours=ours, theirs=theirs, id_key=id_key) -> dict[str, Any]:
            games = []
            for a, b in ((theirs, ours), (ours, theirs)):  # game 1: the baseline is A; game 2: swapped
                user = ARENA_HARD_TEMPLATE.format(question_1=q.turns[0], answer_1=a, answer_2=b)
                conv = [{"role": "system", "content": ARENA_HARD_SYSTEM}, {"role": "user", "content": user}]
                judgment, verdict = "", None
                for _ in range(ARENA_HARD_ATTEMPTS):
                    reply = chat(conv, ARENA_HARD_MAX_TOKENS)
                    judgment += "\n" + reply
                    verdict, again = arena_hard_verdict(judgment)
                    conv.append({"role": "assistant", "content": reply})
                    if not again:
                        break
                    conv.append({"role": "user", "content": ARENA_HARD_RETRY})
                games.append({"user_prompt": user, "judgment": judgment, "score": verdict})
            return {id_key: q.id, "model": model_id, "judge": judge_model, "games": games}

        tasks.append(JudgeTask(str(q.id), run))
    return tasks


# --------------------------------------------------------------------------------------------- AlignBench
def alignbench_rating(judgment: str) -> tuple[dict[str, int], float]:
    """The last `{...}` of the judgment as {dimension: score}, and its overall score (-1 when absent)."""
    rating: dict[str, int] = {}
    match = re.search(r"{(.*?)}(?![^{]*{)", judgment)
    if match:
        rating = {k: int(v) for k, v in re.findall(r"'(.*?)': (\d+)", match.group(1))}
    score: float = rating.get("综合得分", -1)
    if score == -1:
        found = re.search(r"'综合得分': (\d+(\.\d{1,2})?)", judgment)
        score = float(found.group(1)) if found else -1
    return rating, score


def alignbench_tasks(answers: list[dict[str, Any]], config: dict[str, dict[str, Any]]) -> list[JudgeTask]:
    dimension_set, definitions, subcategories = (config[name] for name in ALIGNBENCH_CONFIG)
    tasks = []
    for doc in answers:
        dimensions = dimension_set.get(subcategories.get(doc.get("subcategory")), []) or []
        described = "".join(f"{i + 1}. {d}: {definitions.get(d)}\n" for i, d in enumerate(dimensions))
        prompt = ALIGNBENCH_PROMPT.format(
            category=doc.get("category"),
            dimensions=described,
            question=doc.get("question"),
            reference=doc.get("reference"),
            answer=doc.get("answer"),
        )

        def run(chat: Chat, doc=doc, prompt=prompt, dimensions=dimensions) -> dict[str, Any]:
            judgment = chat([{"role": "user", "content": prompt}], None)
            rating, score = alignbench_rating(judgment)
            return {
                **doc,
                "dimensions": dimensions,
                "judge_prompt": prompt,
                "judgment": judgment,
                "rating": rating,
                "score": score,
            }

        tasks.append(JudgeTask(str(doc["question_id"]), run))
    return tasks


# --------------------------------------------------------------------------------------------- the endpoint
def api_key(judge: JudgeConfig) -> str | None:
    if judge.api_key_env is None:
        return None
    key = os.environ.get(judge.api_key_env)
    if not key:
        raise UserError(f"eval.judge.api_key_env: the environment variable {judge.api_key_env} is not set")
    return key


def chat_client(judge: JudgeConfig, key: str | None, attempts: int = 3) -> Chat:
    """POST /chat/completions at temperature 0; server errors and timeouts are retried, then a one-line error."""
    url = judge.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def chat(messages: list[dict[str, str]], max_tokens: int | None) -> str:
        body: dict[str, Any] = {"model": judge.model, "messages": messages, "temperature": 0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        error: Exception | None = None
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=judge.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:
                    raise UserError(f"eval.judge: {url}: HTTP {e.code}: {first_line(e)}") from None
                error = e
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
                error = e
            time.sleep(2**attempt)
        raise UserError(f"eval.judge.base_url: {url}: {first_line(error or Exception('no answer'))}")

    return chat


# --------------------------------------------------------------------------------------------- shell
def judge_files(cfg: FusechatConfig, benchmark: str) -> dict[str, Path] | str:
    """The harness files a benchmark's judge needs, or why it cannot run (one line)."""
    spec = getattr(cfg.eval.judged, benchmark)
    if spec is None:
        return f"eval.judged.{benchmark} is not configured"
    needed = {"arena_hard": ("baseline",), "mt_bench": ("judge_prompts", "references"), "alignbench": ("config_dir",)}
    files = {}
    for key in needed[benchmark]:
        value = getattr(spec, key)
        if value is None:
            return f"eval.judged.{benchmark}.{key} is not set"
        if not Path(value).expanduser().exists():
            return f"eval.judged.{benchmark}.{key}: {value} not found"
        files[key] = Path(value).expanduser()
    return files


def tasks_for(cfg: FusechatConfig, benchmark: str, directory: Path, model_id: str, files: dict[str, Path]):
    spec = getattr(cfg.eval.judged, benchmark)
    answers = read_jsonl(directory / f"{model_id}.jsonl")
    if benchmark == "alignbench":
        config = {
            name: json.loads((files["config_dir"] / name).read_text(encoding="utf-8")) for name in ALIGNBENCH_CONFIG
        }
        return alignbench_tasks(answers, config)
    questions = read_questions(benchmark, spec.path, spec.limit, f"eval.judged.{benchmark}")
    by_id = {r.get("question_id", r.get("uid")): r for r in answers}
    if benchmark == "mt_bench":
        prompts = {p["name"]: p for p in read_jsonl(files["judge_prompts"])}
        references = {r["question_id"]: r for r in read_jsonl(files["references"])}
        return mt_bench_tasks(questions, by_id, prompts, references, model_id, cfg.eval.judge.model)
    baseline = {r.get("question_id", r.get("uid")): r for r in read_jsonl(files["baseline"])}
    return arena_hard_tasks(questions, by_id, baseline, model_id, cfg.eval.judge.model)


def run_judge(cfg: FusechatConfig, version: Version, log: Callable[[str], None] = print) -> dict[str, int]:
    """Judge the version's answer files; the number of new judgments per benchmark."""
    judge = cfg.eval.judge
    if judge is None:
        return {}
    chat = chat_client(judge, api_key(judge))
    model_id = version.manifest["counts"]["model_id"]
    written: dict[str, int] = {}
    for benchmark in version.manifest["counts"].get("judged", {}):
        if benchmark == "alpaca_eval":
            log("judge alpaca_eval: graded by alpaca_eval itself (see README); its leaderboard.csv is read from there")
            continue
        files = judge_files(cfg, benchmark)
        if isinstance(files, str):
            log(f"judge {benchmark}: skipped ({files})")
            continue
        directory = version.path / "judged" / benchmark
        out = directory / JUDGMENTS
        tasks = tasks_for(cfg, benchmark, directory, model_id, files)
        done = {_key(benchmark, r) for r in read_jsonl(out)} if out.is_file() else set()
        todo = [t for t in tasks if t.key not in done]
        log(f"judge {benchmark}: {len(todo)} judgments to ask {judge.model} ({len(tasks) - len(todo)} done before)")
        lock = threading.Lock()

        def one(task: JudgeTask, out: Path = out, lock: threading.Lock = lock) -> None:
            record = task.run(chat)
            with lock, out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

        with ThreadPoolExecutor(max_workers=judge.parallel) as pool:
            list(pool.map(one, todo))
        written[benchmark] = len(todo)
    return written


def _key(benchmark: str, record: dict[str, Any]) -> str:
    qid = record.get("question_id", record.get("uid"))
    return f"{qid}:{record.get('turn')}" if benchmark == "mt_bench" else str(qid)
