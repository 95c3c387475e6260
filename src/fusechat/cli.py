"""The `fusechat` command line: one Typer command per stage, each a thin call into the stage's module.

User mistakes surface as one line on stderr and exit code 2 (`UserError`); nothing half-written stays visible.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fusechat.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fuse several chat LLMs into one compact target model (FuseChat-3.0): "
    "prompts -> sample -> score -> build -> sft -> dpo -> eval.",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="The run's YAML config (see configs/).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set sft.learning_rate=1e-5 (repeatable).")
]
InputOpt = Annotated[
    list[str] | None, typer.Option("--input", help="Pin an input version: --input prompts=v002 (repeatable).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Make a new version even when a cached one matches.")]


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def parse_inputs(items: list[str] | None) -> dict[str, str]:
    pinned = {}
    for item in items or []:
        stage, sep, version = item.partition("=")
        if not sep or not stage or not version:
            raise UserError(f"--input {item!r}: expected stage=vNNN")
        pinned[stage.strip()] = version.strip()
    return pinned


def _load(config: Path, overrides: list[str] | None):
    from fusechat.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return load_config(config, overrides)


def _store(cfg):
    from fusechat.store import RunStore

    return RunStore(cfg.run_dir)


@app.command()
@user_errors
def prompts(config: ConfigOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Ingest the configured prompt sources: map fields, drop empties and duplicates, split sft/dpo."""
    from fusechat.prompts import run_prompts

    cfg = _load(config, set_)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(source: str, rows: int) -> None:
            if source not in tasks:
                tasks[source] = bar.add_task(source)
            bar.update(tasks[source], description=f"{source}: {rows:,} rows read")

        version = run_prompts(cfg, _store(cfg), force=force, log=console.print, progress=progress)
    by_domain = version.manifest["counts"].get("by_domain", {})
    for domain, splits in by_domain.items():
        console.print(f"  {domain}: " + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())))


@app.command()
@user_errors
def status(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Show every stage's versions: counts, creation time, inputs (lineage), complete or partial."""
    from fusechat.config import load_config
    from fusechat.status import status_table

    cfg = load_config(config, set_, check_trl=False)
    console.print(status_table(_store(cfg)))


@app.command()
@user_errors
def sft(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Fine-tune the target on a datasets version (TRL SFTTrainer; loss on the assistant turn only).
    `sft.num_processes` / `sft.accelerate_config` relaunch it under `accelerate launch`."""
    from fusechat.train.sft import run_sft

    cfg = _load(config, set_)
    _show_training(run_sft(cfg, _store(cfg), pinned=parse_inputs(input_), force=force, log=console.print))


@app.command()
@user_errors
def dpo(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """DPO from the latest (or --input sft=vNNN) sft model on a datasets version (TRL DPOTrainer)."""
    from fusechat.train.dpo import run_dpo

    cfg = _load(config, set_)
    _show_training(run_dpo(cfg, _store(cfg), pinned=parse_inputs(input_), force=force, log=console.print))


def _show_training(version) -> None:
    if version is None:
        return
    train = version.manifest.get("train", {})
    shown = ("world_size", "global_step", "final_loss", "mean_loss", "reward_accuracy", "reward_margin", "tokens_per_s")
    console.print("  " + ", ".join(f"{k}={train[k]:.4g}" if isinstance(train[k], float) else f"{k}={train[k]}"
                                   for k in shown if train.get(k) is not None))
    console.print(f"  model: {version.path / 'model'}")


@app.command()
@user_errors
def sample(
    config: ConfigOpt,
    input_: InputOpt = None,
    source: Annotated[str | None, typer.Option("--source", help="Run only this source model.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Run part I of N of the chunks, e.g. 2/8.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Each source model answers each prompt k times (vLLM or transformers), in resumable chunks. Jobs with
    --source/--shard fill one version together; it completes when every chunk exists."""
    from rich.progress import BarColumn, MofNCompleteColumn

    from fusechat.sample import run_sample
    from fusechat.shards import ShardSpec

    spec = ShardSpec.parse(shard)
    cfg = _load(config, set_)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("chunks {task.fields[rate]}"), TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int, tokens: int, seconds: float) -> None:
            rate = f"{tokens:,} tokens, {tokens / seconds:,.0f} tok/s" if seconds else ""
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, rate=rate)
            bar.update(tasks[name], completed=done, rate=rate)

        version = run_sample(cfg, _store(cfg), pinned=parse_inputs(input_), force=force, source=source, shard=spec,
                             log=console.print, progress=progress)
    if version is not None:
        counts = version.manifest["counts"]
        timings = version.manifest["timings"].get("by_source", {})
        for name, c in counts.get("by_source", {}).items():
            rate = timings.get(name, {}).get("tokens_per_s", 0)
            console.print(f"  {name}: prompts={c.get('prompts', 0)} samples={c.get('samples', 0)} "
                          f"tokens={c.get('tokens', 0)} skipped_too_long={c.get('skipped_too_long', 0)} "
                          f"tok/s={rate:,.0f}")


@app.command()
@user_errors
def score(
    config: ConfigOpt,
    input_: InputOpt = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Score part I of N of the chunks, e.g. 2/8.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Reward every sample and verify math answers and code (sandboxed), per domain route, in resumable chunks.
    Jobs with --shard fill one version together; it completes when every chunk exists."""
    from rich.progress import BarColumn, MofNCompleteColumn

    from fusechat.score.stage import run_score
    from fusechat.shards import ShardSpec

    spec = ShardSpec.parse(shard)
    cfg = _load(config, set_)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("scoring responses", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        version = run_score(cfg, _store(cfg), pinned=parse_inputs(input_), force=force, shard=spec,
                            log=console.print, progress=progress)
    if version is not None:
        counts, timings = version.manifest["counts"], version.manifest["timings"].get("scorers", {})
        console.print(f"  responses={counts.get('responses', 0)} truncated={counts.get('truncated', 0)}")
        for verdict, n in counts.get("by_verdict", {}).items():
            console.print(f"  {verdict}: {n}", emoji=False, markup=False)  # "reward:ok:" is no emoji
        for name, t in timings.items():
            console.print(f"  {name}: {t['responses']} responses, {t['responses_per_s']} responses/s")


@app.command()
@user_errors
def build(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Select the SFT set (best response over all sources) and the DPO set (best vs worst of one source, reward
    gap inside build.margin) from a scores version; prints what was kept and dropped."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn

    from fusechat.build import run_build, stats_tables

    cfg = _load(config, set_)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        version = run_build(cfg, _store(cfg), pinned=parse_inputs(input_), force=force, log=console.print,
                            progress=progress)
    stats = json.loads((version.path / "stats.json").read_text())
    for table in stats_tables(stats):
        console.print(table)
    console.print(f"  sft: {version.path / 'sft'}  dpo: {version.path / 'dpo'}")


def main() -> None:
    try:
        app(prog_name="fusechat")
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
