"""The tiny demo world: skill prompts, held-out eval sets, three specialist sources, a weak target and a reward
model, all built locally in a few minutes on a laptop CPU.

Each source is a different architecture with its own tokenizer and chat template, trained briefly (so it is
imperfect) on two of the four skills, answering in its own style. The target (same size) is trained on all
skills just long enough to follow the format, so it is weak on every one. The reward model (sequence classification, one output) is
trained on the world's labelled correct/incorrect answers. The world is cached: same spec, same directory, no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fusechat.demo.skills import SKILLS, STYLES, make_prompts, wrong_answer


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    arch: str  # llama, qwen2, mistral
    chat: str  # chatml, llama3, mistral
    tokenizer: str  # char, bpe
    skills: tuple[str, ...]
    weights: tuple[float, ...] = ()  # share of each skill's training rows (default 1 each): an easy skill gets
    # less, so that every source stays imperfect (DPO needs wrong answers too)
    style: str = "plain"
    steps: int = 600
    lr: float = 2e-3
    hidden: int = 96
    layers: int = 3
    heads: int = 3  # head size 32: vLLM's CPU attention supports 32, 64, 80, ...
    kv_heads: int = 1


DEFAULT_SOURCES = (
    ModelRecipe("llama-src", "llama", "llama3", "char", ("last", "max"), (1.0, 0.3), style="plain", steps=380),
    ModelRecipe("qwen2-src", "qwen2", "chatml", "char", ("sort", "count"), (1.0, 0.3), style="answer", steps=450),
    ModelRecipe("mistral-src", "mistral", "mistral", "bpe", ("count", "max"), (1.0, 0.3), style="equals", steps=260),
)
DEFAULT_TARGET = ModelRecipe("target", "llama", "chatml", "char", tuple(SKILLS), style="plain", steps=60)


@dataclass(frozen=True)
class WorldSpec:
    version: int = 3  # bump when the skills or the training code change: a cached world is then rebuilt
    seed: int = 0
    fusion_per_skill: int = 2000
    eval_per_skill: int = 200
    train_per_skill: int = 4000
    sources: tuple[ModelRecipe, ...] = DEFAULT_SOURCES
    target: ModelRecipe = DEFAULT_TARGET
    reward_steps: int = 150
    batch_size: int = 64
    workers: int = 2  # training jobs in parallel (1 torch thread each: more throughput than 1 job x 2 threads)

    def small(self) -> WorldSpec:
        """A quicker world for tests: fewer prompts and steps (fusion is weaker but every stage runs)."""
        return replace(
            self,
            fusion_per_skill=120,
            eval_per_skill=40,
            train_per_skill=600,
            reward_steps=40,
            sources=tuple(replace(s, steps=60) for s in self.sources),
            target=replace(self.target, steps=30),
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class World:
    root: Path
    spec: WorldSpec
    info: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str) -> Path:
        return self.root / "models" / name


def build_world(root: str | Path, spec: WorldSpec = WorldSpec(), log: Callable[[str], None] = print) -> World:
    """Build (or reuse) the world under `root`. Built in a temporary sibling and renamed when complete."""
    root = Path(root)
    info_path = root / "world.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("digest") == spec.digest():
            log(f"cached: world {root} ({info['digest']})")
            return World(root, spec, info)
        log(f"world spec changed: rebuilding {root}")
    started = time.time()
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_prompt_files(tmp, spec)
    t_files = time.time() - started
    jobs = [_lm_job(tmp, spec, r) for r in (*spec.sources, spec.target)] + [_reward_job(tmp, spec)]
    jobs.sort(key=lambda j: -j["steps"])  # longest first: better packing on the worker pool
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=spec.workers, initializer=_one_thread) as pool:
        for name, seconds in pool.map(_run_job, jobs):
            timings[name] = seconds
            log(f"  trained {name} in {seconds:.0f}s")
    info = {
        "digest": spec.digest(),
        "spec": asdict(spec),
        "timings_s": {"files": round(t_files, 2), **timings, "total": round(time.time() - started, 1)},
    }
    (tmp / "world.json").write_text(json.dumps(info, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    return World(root, spec, info)


def write_prompt_files(root: Path, spec: WorldSpec) -> None:
    """prompts/<skill>.jsonl (fusion prompts, fed to `fusechat prompts`), eval/<skill>.jsonl (held out),
    train/<skill>.jsonl (what the world's models learn from). Eval prompts never appear in the others."""
    for sub in ("prompts", "eval", "train"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        held_out = make_prompts(skill, spec.eval_per_skill, seed=spec.seed + 999)
        excluded = {p for p, _ in held_out}
        fusion = make_prompts(skill, spec.fusion_per_skill, seed=spec.seed + 1, exclude=excluded)
        train = make_prompts(skill, spec.train_per_skill, seed=spec.seed + 2, exclude=excluded, unique=False)
        for sub, rows in (("eval", held_out), ("prompts", fusion), ("train", train)):
            with (root / sub / f"{skill}.jsonl").open("w") as fh:
                for prompt, answer in rows:
                    fh.write(json.dumps({"prompt": prompt, "answer": answer, "skill": skill}) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lm_job(root: Path, spec: WorldSpec, recipe: ModelRecipe) -> dict[str, Any]:
    return {
        "kind": "lm",
        "root": str(root),
        "recipe": asdict(recipe),
        "steps": recipe.steps,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
    }


def _reward_job(root: Path, spec: WorldSpec) -> dict[str, Any]:
    return {
        "kind": "reward",
        "root": str(root),
        "steps": spec.reward_steps,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
    }


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import datasets
    import torch

    datasets.disable_progress_bars()

    torch.set_num_threads(1)


def _run_job(job: dict[str, Any]) -> tuple[str, float]:
    started = time.time()
    if job["kind"] == "lm":
        name = _train_lm(job)
    else:
        name = _train_reward(job)
    return name, round(time.time() - started, 1)


def _corpus(root: Path) -> list[str]:
    rows = [r for skill in SKILLS for r in read_jsonl(root / "train" / f"{skill}.jsonl")]
    return [f"{r['prompt']}\n{style.format(r['answer'])}" for r in rows for style in STYLES.values()]


def _common_args(out: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict[str, Any]:
    return dict(
        output_dir=str(out / "_trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_pin_memory=False,
        max_length=128,
        seed=seed,
        disable_tqdm=True,
    )


def _train_lm(job: dict[str, Any]) -> str:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from fusechat.demo.tiny import TinySpec, build_model, build_tokenizer, save_tiny

    recipe = job["recipe"]
    root = Path(job["root"])
    r = ModelRecipe(**{**recipe, "skills": tuple(recipe["skills"]), "weights": tuple(recipe["weights"])})
    seed = job["seed"] * 100 + sum(map(ord, r.name))
    tok = build_tokenizer(r.chat, r.tokenizer, _corpus(root) if r.tokenizer == "bpe" else None)
    model = build_model(
        TinySpec(
            arch=r.arch,
            chat=r.chat,
            tokenizer=r.tokenizer,
            hidden=r.hidden,
            layers=r.layers,
            heads=r.heads,
            kv_heads=r.kv_heads,
            seed=seed,
        ),
        tok,
    )
    style = STYLES[r.style]
    rows = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": style.format(row["answer"])}],
        }
        for skill, weight in zip(r.skills, r.weights or [1.0] * len(r.skills), strict=True)
        for row in _head(read_jsonl(root / "train" / f"{skill}.jsonl"), weight)
    ]
    random.Random(seed).shuffle(rows)
    out = root / "models" / r.name
    args = SFTConfig(**_common_args(out, r.steps, job["batch_size"], r.lr, seed))
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    _quiet(trainer)
    trainer.train()
    save_tiny(trainer.model, tok, out)
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    return r.name


def _quiet(trainer) -> None:
    """World building reports one line per model, not every loss (the logs stay in the trainer state)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _head(rows: list[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    return rows[: max(1, round(len(rows) * share))]


def _train_reward(job: dict[str, Any]) -> str:
    """Pairs (correct answer, plausible wrong answer), each in a random style: the model learns correctness,
    not style."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    from fusechat.demo.tiny import TinySpec, build_model, build_tokenizer, save_tiny

    root, seed = Path(job["root"]), job["seed"] * 100 + 7
    rng = random.Random(seed)
    styles = list(STYLES.values())
    rows = []
    for skill in SKILLS:
        for row in read_jsonl(root / "train" / f"{skill}.jsonl"):
            prompt = [{"role": "user", "content": row["prompt"]}]
            good = rng.choice(styles).format(row["answer"])
            bad = rng.choice(styles).format(wrong_answer(skill, row["answer"], rng))
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
    rng.shuffle(rows)
    tok = build_tokenizer("chatml", "char")
    model = build_model(
        TinySpec(arch="llama", chat="chatml", tokenizer="char", heads=3, kv_heads=1, seed=seed), tok, reward=True
    )
    out = root / "models" / "reward"
    args = RewardConfig(**_common_args(out, job["steps"], job["batch_size"], 1e-3, seed))
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    _quiet(trainer)
    trainer.train()
    save_tiny(trainer.model, tok, out)
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    return "reward"
