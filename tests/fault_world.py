"""The small pipeline the fault suite breaks: two tiny sources (transformers engine) and one `engine: dataset` source
(the math file's own solutions, kept in the prompts version's responses.parquet), a tiny reward model, build, SFT
and DPO with checkpoints, run once cleanly (the reference every faulty run is compared with), plus the tools to kill
a stage at a chosen moment and compare what a resumed run made with the clean run. Samples live in per-source parts
(`samples/parts/<source>-<fp>/`, linked into the samples version), so the tools look there for sample chunks.

Every path in the config is absolute except `workdir` (relative), so a copy of the clean run directory under
another folder is the same run: its versions are cache hits there, and a stage resumed there must reproduce the
clean run's files byte for byte (same inputs, same seed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from fusechat.store import RunStore

NAME = "f"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "COLUMNS": "200",
}
# The stages in order, by directory name, with the CLI verb that makes each.
VERBS = {"prompts": "prompts", "samples": "sample", "scores": "score", "datasets": "build", "sft": "sft", "dpo": "dpo"}
ORDER = list(VERBS)
# Row keys of each stage's data (a key seen twice is a duplicated row).
KEYS = {
    "prompts": ("prompt_id",),
    "samples": ("prompt_id", "source", "sample_index"),
    "scores": ("prompt_id", "source", "sample_index"),
    "datasets": ("prompt_id", "source"),
}
SFT_STEPS, DPO_STEPS = 10, 7  # neither a whole number of epochs: a resume at the end must not run on


def world_config(root: Path, models: dict[str, Path]) -> dict[str, Any]:
    """16 prompts in two domains; llama answers each twice, qwen math three times and chat once, and `answers` takes
    one of the two solutions each math problem ships with (one row per solution, as OpenMathInstruct-2)."""
    rows = [{"q": f"Tell me about the number {i}.", "kind": "chat"} for i in range(8)]
    rows += [
        {"q": f"What is {i} plus {i + 3}?", "a": str(2 * i + 3), "kind": "math", "sol": sol}
        for i in range(8)
        # neither is exact: math makes no SFT row, so the training sets (and the kill points' steps) stay as they are
        for sol in (f"{i} + {i + 3} = {2 * i + 3}", f"The sum is {2 * i + 3}.")
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"engine": "transformers", "chunk_size": 2, "batch_size": 2, "sampling": {"max_tokens": 8}}
    # on CPU also where a GPU is visible: the suite compares weights bit for bit
    train = {"logging_steps": 1, "max_length": 128, "save_strategy": "steps", "use_cpu": True}
    return {
        "name": NAME,
        "workdir": "runs",
        "seed": 11,
        "prompts": {
            "sources": [
                {
                    "name": kind,
                    "path": str(root / "prompts.jsonl"),
                    "domain": kind,
                    "fields": {"prompt": "q", **({"answer": "a", "response": "sol"} if kind == "math" else {})},
                    "exclude": {"kind": ["math" if kind == "chat" else "chat"]},
                    **({"max_responses": 2} if kind == "math" else {}),
                }
                for kind in ("chat", "math")
            ]
        },
        "sources": [
            {
                "name": "llama",
                "model": str(models["llama"]),
                "samples": {"chat": 2, "math": 2},
                **copy.deepcopy(common),
            },
            {"name": "qwen", "model": str(models["qwen2"]), "samples": {"chat": 1, "math": 3}, **copy.deepcopy(common)},
            # k = 1: no DPO pair of its own, so the DPO set (and its steps) stay those of the two models
            {"name": "answers", "engine": "dataset", "dataset": "math", "samples": {"math": 1}, "chunk_size": 4},
        ],
        "score": {
            "reward_model": {"path": str(models["reward"]), "max_length": 256},
            "routes": {"math": ["reward", "exact"]},
            "shard_size": 4,
        },
        "build": {"margin": [0.0, 1000.0], "max_length": 512, "drop_truncated": False},
        "target": {"path": str(models["llama"])},
        "sft": {  # 3 rows, 3 steps an epoch: the checkpoint of step 5 is mid-epoch (the data order is skipped to)
            **train,
            "per_device_train_batch_size": 1,
            "max_steps": SFT_STEPS,
            "save_steps": 5,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
        },
        "dpo": {  # 5 pairs, 3 steps an epoch; checkpoints 3, 6 and 7 (the last step), kept as step-N
            **train,
            "per_device_train_batch_size": 2,
            "max_steps": DPO_STEPS,
            "save_steps": 3,
            "learning_rate": 1e-3,
            "beta": 0.1,
        },
    }


@dataclass
class World:
    root: Path  # holds prompts.jsonl, cfg.yaml and the clean run (runs/f/...)
    cfg_path: Path
    config: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / NAME

    @property
    def store(self) -> RunStore:
        return RunStore(self.run_dir)

    def clean(self, stage: str):
        [version] = self.store.versions(stage)
        return version

    def case(
        self, folder: Path, upto: str | None, config: dict[str, Any] | None = None, parts: tuple[str, ...] = ()
    ) -> Path:
        """A folder with the config and a copy of the clean run's versions of the stages before `upto` (all of
        them for None), plus the clean samples parts of the sources named in `parts` (reused by a samples run
        there); returns the folder (run the CLI with it as the working directory)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cfg.yaml").write_text(yaml.safe_dump(config or self.config, sort_keys=False))
        keep = ORDER if upto is None else ORDER[: ORDER.index(upto)]
        for stage in keep:
            shutil.copytree(self.run_dir / stage, folder / "runs" / NAME / stage, symlinks=True)
        for source in parts:
            [part] = (self.run_dir / "samples" / "parts").glob(f"{source}-*")
            shutil.copytree(part, folder / "runs" / NAME / "samples" / "parts" / part.name)
        return folder


def build_world(root: Path, models: dict[str, Path]) -> World:
    """Run the whole pipeline once, in this process."""
    from fusechat.build import run_build
    from fusechat.config import load_config
    from fusechat.prompts import run_prompts
    from fusechat.sample import run_sample
    from fusechat.score.stage import run_score
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    config = world_config(root, models)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        cfg = load_config(cfg_path)
        store = RunStore(cfg.run_dir)
        quiet = {"log": lambda _: None}
        run_prompts(cfg, store, **quiet)
        run_sample(cfg, store, **quiet)
        run_score(cfg, store, **quiet)
        run_build(cfg, store, **quiet)
        run_sft(cfg, store, **quiet)
        run_dpo(cfg, store, **quiet)
    finally:
        os.chdir(cwd)
    return World(root, cfg_path, config)


def resume(folder: Path, stage: str, log: Callable[[str], None] | None = None):
    """Run `stage` to completion in `folder`, in this process (what a user's re-run does)."""
    from fusechat.build import run_build
    from fusechat.config import load_config
    from fusechat.sample import run_sample
    from fusechat.score.stage import run_score
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    runs = {"samples": run_sample, "scores": run_score, "datasets": run_build, "sft": run_sft, "dpo": run_dpo}
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        cfg = load_config(folder / "cfg.yaml")
        version = runs[stage](cfg, RunStore(cfg.run_dir), log=log or (lambda _: None))
    finally:
        os.chdir(cwd)
    return dataclasses.replace(version, path=folder / version.path)


# ------------------------------------------------------------------------------------------------ killing
@dataclass
class Kill:
    """A stage run as a CLI process, killed (SIGKILL to its process group) once `ready(run_dir)` holds."""

    name: str
    stage: str
    ready: Callable[[Path], bool]
    folder: Path | None = None
    proc: subprocess.Popen | None = None
    killed: bool = False
    output: str = ""
    landed: str = ""  # what the run directory held when the kill landed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.folder / "runs" / NAME


def start(kill: Kill) -> None:
    kill.proc = subprocess.Popen(
        [sys.executable, "-m", "fusechat.cli", VERBS[kill.stage], "-c", "cfg.yaml", *kill.extra.get("args", [])],
        cwd=kill.folder,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches score workers and launchers too
    )


def kill_all(kills: list[Kill], timeout: float = 400.0, slice_s: float = 0.002) -> None:
    """Kill each run as soon as its condition holds. Polling alone can miss a moment that lasts a few
    milliseconds (a checkpoint folder between its save and the end of training), so once a run's partial folder
    exists, it runs in slices: continued for `slice_s`, stopped (SIGSTOP to its group), its files checked, and
    killed while stopped when its condition holds. The kill lands within one slice of the moment."""
    pending = list(kills)
    deadline = time.monotonic() + timeout

    def group(k: Kill, sig: int) -> None:
        try:
            os.killpg(k.proc.pid, sig)
        except ProcessLookupError:
            pass

    while pending and time.monotonic() < deadline:
        near = [k for k in pending if partial_of(k.run_dir, k.stage) is not None or committed(k.stage)(k.run_dir)]
        for k in near:
            group(k, signal.SIGCONT)
        time.sleep(slice_s)
        for k in near:
            group(k, signal.SIGSTOP)
        for k in list(pending):
            try:
                ready = k.ready(k.run_dir)
            except OSError:  # a folder renamed under the glob
                ready = False
            if ready and k.proc.poll() is None:
                group(k, signal.SIGKILL)
                group(k, signal.SIGCONT)
                k.killed = True
            if ready or k.proc.poll() is not None:
                k.output = k.proc.communicate()[0]
                k.landed = describe(k.run_dir, k.stage)
                pending.remove(k)
    for k in pending:
        group(k, signal.SIGKILL)
        group(k, signal.SIGCONT)
        k.output = k.proc.communicate()[0] + "\n(timed out before its kill point)"


def describe(run_dir: Path, stage: str) -> str:
    d = run_dir / stage
    if not d.is_dir():
        return "nothing"
    versions = sorted(p.name for p in d.iterdir() if p.name.startswith("v"))
    partial = [p for p in d.iterdir() if p.name.startswith((".partial-", ".tmp-"))]
    if versions:
        return f"committed {versions[-1]}"
    if not partial:
        return "no partial folder"
    p = partial[0]
    chunks = len(list((p / "data").glob("*.parquet"))) if (p / "data").is_dir() else 0
    if stage == "samples":  # chunks live in the sources' parts; the version's folder gets links at the end
        done = {part.name.split("-")[0]: len(list(part.glob("data/*.parquet"))) for part in sorted(parts_of(run_dir))}
        return f"partial: part chunks {done}, {chunks} linked"
    checkpoints = (
        sorted(q.name for q in (p / "checkpoints").glob("checkpoint-*")) if (p / "checkpoints").is_dir() else []
    )
    return f"partial: {chunks} chunk(s), checkpoints {checkpoints or '-'}, model/ {'yes' if (p / 'model').is_dir() else 'no'}"


def partial_of(run_dir: Path, stage: str) -> Path | None:
    found = sorted((run_dir / stage).glob(".partial-*")) + sorted((run_dir / stage).glob(".tmp-*"))
    return found[0] if found else None


def count(pattern: str, n: int, stage: str) -> Callable[[Path], bool]:
    """At least `n` files matching `pattern` in the stage's partial (or temporary) folder."""

    def ready(run_dir: Path) -> bool:
        p = partial_of(run_dir, stage)
        return p is not None and len(list(p.glob(pattern))) >= n

    return ready


def parts_of(run_dir: Path) -> list[Path]:
    root = run_dir / "samples" / "parts"
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []


def part_chunks(n: int, source: str | None = None) -> Callable[[Path], bool]:
    """At least `n` finished chunk files in the samples parts (of `source` only, if given)."""

    def ready(run_dir: Path) -> bool:
        parts = [p for p in parts_of(run_dir) if source is None or p.name.startswith(f"{source}-")]
        return sum(len(list(p.glob("data/*.parquet"))) for p in parts) >= n

    return ready


def exists(stage: str, rel: str = "") -> Callable[[Path], bool]:
    """The stage's partial (or temporary) folder exists, and `rel` inside it (a checkpoint, model/, ...)."""

    def ready(run_dir: Path) -> bool:
        p = partial_of(run_dir, stage)
        return p is not None and (not rel or (p / rel).exists())

    return ready


def saved(stage: str, checkpoint: str) -> Callable[[Path], bool]:
    """The Trainer checkpoint is whole: its trainer_state.json (written last, not atomically) parses."""

    def ready(run_dir: Path) -> bool:
        p = partial_of(run_dir, stage)
        try:
            json.loads((p / "checkpoints" / checkpoint / "trainer_state.json").read_text())
        except (OSError, TypeError, ValueError):
            return False
        return True

    return ready


def committed(stage: str) -> Callable[[Path], bool]:
    return lambda run_dir: any(p.name.startswith("v") for p in (run_dir / stage).glob("v*"))


# ------------------------------------------------------------------------------------------------ comparing
def data_files(version_dir: Path) -> dict[str, bytes]:
    """Every file of a version (or of a samples part) except its manifest (which holds timings and dates) and
    hidden side files (a part's chunk timings), by relative path."""
    return {
        p.relative_to(version_dir).as_posix(): p.read_bytes()
        for p in sorted(version_dir.rglob("*"))
        if p.is_file()
        and p.name != "manifest.json"
        and not any(q.startswith(".") for q in p.relative_to(version_dir).parts)
    }


def rows(version_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(version_dir.rglob("*.parquet")):
        if f.name == "ref_logps.parquet":
            continue
        part = f.relative_to(version_dir).parts[0]
        out += [{"_part": part, **r} for r in pq.read_table(f).to_pylist()]
    return out


def tally(stage: str, clean_dir: Path, other_dir: Path) -> dict[str, int]:
    """Rows lost, duplicated and differing (same key, other values) against the clean version."""
    key_cols = ("_part", *KEYS[stage])

    def by_key(rs):
        out: dict[tuple, list[dict]] = {}
        for r in rs:
            out.setdefault(tuple(json.dumps(r[c], default=str) for c in key_cols), []).append(r)
        return out

    clean, other = by_key(rows(clean_dir)), by_key(rows(other_dir))
    return {
        "rows": sum(map(len, clean.values())),
        "lost": sum(len(v) for k, v in clean.items() if k not in other),
        "duplicated": sum(len(v) - 1 for v in other.values() if len(v) > 1),
        "differing": sum(1 for k, v in other.items() if k in clean and v[0] != clean[k][0]),
        "extra": sum(len(v) for k, v in other.items() if k not in clean),
    }


def weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def record(name: str, outcome: dict[str, Any]) -> None:
    """Append a case's outcome to the tally file named by FUSECHAT_FAULT_TALLY (for the report), if set."""
    path = os.environ.get("FUSECHAT_FAULT_TALLY")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": name, **outcome}, default=str) + "\n")
