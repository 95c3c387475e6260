"""Small synthetic files in the real layouts of the recipes' instruction, math and Chinese datasets (content
invented, shape real; the code datasets are in `code_fixtures.py`).

- openbmb/UltraFeedback (JSON lines, one file per `source` upstream, read in that order): `source`, `instruction`,
  `models` (list), `completions` (list of {annotations, critique, custom_system_prompt, fine-grained_score, model,
  overall_score, principle, response}), `correct_answers`, `incorrect_answers`. No category column.
- Magpie-Align/Magpie-Pro-DPO-100K-v0.1 (Parquet): `uuid`, `instruction`, `gen_input_configs`, `intent`,
  `knowledge`, `difficulty`, `input_quality`, `quality_explanation`, `task_category`, `input_length`, `responses`,
  `gen_response_configs`, `rewards_armorm` (list of {score}), `chosen` / `rejected` (lists of {content, role}).
- nvidia/HelpSteer2 (JSON lines): `prompt`, `response`, `helpfulness`, `correctness`, `coherence`, `complexity`,
  `verbosity`; two consecutive rows per prompt; multi-turn prompts hold earlier turns after
  `<extra_id_1>Assistant` / `<extra_id_1>User` markers.
- nvidia/OpenMathInstruct-2 (JSON lines): `problem`, `generated_solution` (ends in \\boxed{...}), `expected_answer`,
  `problem_source`; one row per solution, so a problem appears on several rows.
- llamafactory/alpaca_gpt4_zh (a JSON array): `instruction`, `input`, `output`.
- Magpie-Align/Magpie-Qwen2-Pro-200K-Chinese (Parquet): `uuid`, `model`, `gen_input_configs`, `instruction`,
  `response`, `conversations` (list of {from, value}), `task_category`, `other_task_category`, `difficulty`,
  `input_quality`, `llama_guard_2`, `instruct_reward`, `language`, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

UF_SOURCES = ("evol_instruct", "false_qa", "flan_v2_niv2", "sharegpt", "truthful_qa", "ultrachat")
TOPICS = ("gardening", "sailing", "baking", "chess", "poetry", "birds", "history", "tea", "maps", "music")


def _completion(model: str, text: str) -> dict:
    rating = {"Rating": "4", "Rationale": "Clear and relevant."}
    return {
        "annotations": {
            "helpfulness": rating,
            "honesty": rating,
            "instruction_following": rating,
            "truthfulness": rating,
        },
        "critique": "The answer is correct and concise.",
        "custom_system_prompt": "You are a helpful assistant.",
        "fine-grained_score": 4.25,
        "model": model,
        "overall_score": 7.5,
        "principle": "helpfulness",
        "response": text,
    }


def write_ultrafeedback(path: Path, per_source: dict[str, int] | int = 4, extra: list[tuple[str, str]] = ()) -> Path:
    """Rows grouped by `source`, as the upstream files load. `extra`: (source, instruction) rows appended to their
    group (e.g. code or math prompts the topic rule must drop)."""
    counts = per_source if isinstance(per_source, dict) else dict.fromkeys(UF_SOURCES, per_source)
    rows = []
    for source, n in counts.items():
        texts = [f"Tell me one thing about {TOPICS[i % len(TOPICS)]} ({source} prompt {i})." for i in range(n)]
        texts += [text for s, text in extra if s == source]
        for text in texts:
            rows.append(
                {
                    "source": source,
                    "instruction": text,
                    "models": ["gpt-4", "llama-2-70b-chat"],
                    "completions": [_completion("gpt-4", "An answer."), _completion("llama-2-70b-chat", "Another.")],
                    "correct_answers": ["None"],
                    "incorrect_answers": ["None"],
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MAGPIE_CATEGORIES = ("Information seeking", "Creative writing", "Math", "Coding & Debugging", "Advice seeking")


def write_magpie_pro_dpo(path: Path, n: int = 10) -> Path:
    """Task categories cycle through MAGPIE_CATEGORIES (so every 5th row is Math, every 5th Coding & Debugging)."""
    message = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    rows = []
    for i in range(n):
        category = MAGPIE_CATEGORIES[i % len(MAGPIE_CATEGORIES)]
        instruction = f"Magpie question {i} ({category.lower()}): give advice about {TOPICS[i % len(TOPICS)]}."
        rows.append(
            {
                "uuid": f"{i:08d}-0000-4000-8000-000000000000",
                "instruction": instruction,
                "gen_input_configs": {"input_generator": "meta-llama/Meta-Llama-3-70B-Instruct", "temperature": 1.0},
                "intent": "The user wants advice.",
                "knowledge": "General knowledge.",
                "difficulty": "easy",
                "input_quality": "good",
                "quality_explanation": "The query is clear.",
                "task_category": category,
                "input_length": len(instruction),
                "responses": [f"Response {j}." for j in range(5)],
                "gen_response_configs": {"engine": "vllm", "max_tokens": 4096, "temperature": 0.8},
                "rewards_armorm": [{"score": 0.1 + 0.01 * j} for j in range(5)],
                "chosen": [{"content": instruction, "role": "user"}, {"content": "Response 4.", "role": "assistant"}],
                "rejected": [{"content": instruction, "role": "user"}, {"content": "Response 0.", "role": "assistant"}],
            }
        )
    schema = pa.schema(
        [
            ("uuid", pa.string()),
            ("instruction", pa.string()),
            ("gen_input_configs", pa.struct([("input_generator", pa.string()), ("temperature", pa.float64())])),
            ("intent", pa.string()),
            ("knowledge", pa.string()),
            ("difficulty", pa.string()),
            ("input_quality", pa.string()),
            ("quality_explanation", pa.string()),
            ("task_category", pa.string()),
            ("input_length", pa.int64()),
            ("responses", pa.list_(pa.string())),
            (
                "gen_response_configs",
                pa.struct([("engine", pa.string()), ("max_tokens", pa.int64()), ("temperature", pa.float64())]),
            ),
            ("rewards_armorm", pa.list_(pa.struct([("score", pa.float64())]))),
            ("chosen", message),
            ("rejected", message),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


HELPSTEER2_MULTI_TURN = (
    "I want to plant tomatoes on my balcony.\n<extra_id_1>Assistant\nGood idea: pick a sunny spot and a deep pot."
    "\n<extra_id_1>User\nHow often should I water them?"
)


def write_helpsteer2(path: Path, n: int = 4) -> Path:
    """`n` prompts, two rows each; prompt 0 is multi-turn (HELPSTEER2_MULTI_TURN)."""
    rows = []
    for i in range(n):
        prompt = HELPSTEER2_MULTI_TURN if i == 0 else f"Explain the basics of {TOPICS[(i + 3) % len(TOPICS)]} to me."
        for j in range(2):
            rows.append(
                {
                    "prompt": prompt,
                    "response": f"A response ({j}) to prompt {i}.",
                    "helpfulness": 3 - j,
                    "correctness": 3,
                    "coherence": 4,
                    "complexity": 1,
                    "verbosity": 1 + j,
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_problems(n: int) -> list[tuple[str, str]]:
    """(problem, expected answer) pairs."""
    return [(f"What is {i + 2} times {i + 3}? Give the product.", str((i + 2) * (i + 3))) for i in range(n)]


def write_openmathinstruct2(path: Path, n: int = 6, solutions: int = 3, wrong_every: int = 0) -> Path:
    """`solutions` rows per problem (one row per generated solution, problems interleaved as in the shuffled
    upstream file); with `wrong_every` k > 0, solution j of problem i boxes a wrong answer when (i + j) % k == 0,
    so that a problem has right and wrong solutions (upstream they are nearly all right)."""
    rows = []
    for j in range(solutions):
        for i, (problem, answer) in enumerate(math_problems(n)):
            boxed = str(int(answer) + 1) if wrong_every and (i + j) % wrong_every == 0 else answer
            rows.append(
                {
                    "problem": problem,
                    "generated_solution": f"Multiply the two numbers (way {j}): the product is {boxed}. "
                    f"So the answer is $\\boxed{{{boxed}}}$.",
                    "expected_answer": answer,
                    "problem_source": "augmented_math" if i % 2 else "augmented_gsm8k",
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA_ZH = [
    ("请介绍一下长城的历史。", ""),
    ("给我推荐三本适合周末阅读的小说。", ""),
    ("把下面的句子翻译成英文。", "今天天气很好。"),
    ("写一首关于秋天的短诗。", ""),
    ("用Python写一个函数，返回列表中的最大值。", ""),  # code: dropped by the topic rule
    ("计算 12 乘以 15 等于多少？", ""),  # math: dropped by the topic rule
]


def write_alpaca_gpt4_zh(path: Path) -> Path:
    rows = [{"instruction": i, "input": x, "output": "这是一个回答。"} for i, x in ALPACA_ZH]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return path


MAGPIE_ZH = [
    ("如何提高睡眠质量？", "Advice seeking"),
    ("请解释什么是光合作用。", "Information seeking"),
    ("帮我写一个生日祝福。", "Creative writing"),
    ("求解方程 x^2 - 5x + 6 = 0。", "Math"),
    ("这段JavaScript代码为什么报错？", "Coding & Debugging"),
    ("周末去哪里旅行比较好？", "Planning"),
]


def write_magpie_qwen2_zh(path: Path) -> Path:
    rows = []
    for i, (instruction, category) in enumerate(MAGPIE_ZH):
        rows.append(
            {
                "uuid": f"zh-{i:04d}",
                "model": "Qwen/Qwen2-72B-Instruct",
                "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "input_generator": "Qwen/Qwen2-72B-Instruct"},
                "instruction": instruction,
                "response": "这是一个回答。",
                "conversations": [{"from": "human", "value": instruction}, {"from": "gpt", "value": "这是一个回答。"}],
                "task_category": category,
                "other_task_category": ["Information seeking"],
                "difficulty": "easy",
                "input_quality": "good",
                "llama_guard_2": "safe",
                "instruct_reward": 1.5,
                "language": "ZH",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
