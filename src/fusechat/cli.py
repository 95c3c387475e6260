"""The `fusechat` command line: one Typer command per stage, each a thin call into the stage's module.

User mistakes surface as one line on stderr and exit code 2 (`UserError`); so do the faults a user fixes on the
machine (disk full, read-only or missing permission). Nothing half-written stays visible. Messages and log lines
print as plain text: a path or a config value with `[...]` in it is shown as it is, never read as rich markup.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fusechat.errors import UserError, first_line

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


# Faults of the machine a user fixes there: one line, exit 2, like a user mistake (the message says what to do).
FAULTS = {
    errno.ENOSPC: "no space left on the device; free some and re-run (finished chunks and checkpoints are kept)",
    errno.EDQUOT: "disk quota exceeded; free some and re-run (finished chunks and checkpoints are kept)",
    errno.EROFS: "read-only file system; point workdir at a writable directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Libraries that write files (safetensors, torch, pyarrow) report these faults in their own exception types.
FAULT_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
}


def say(message: Any = "") -> None:
    """A log line as plain text (no markup, no emoji codes, no highlighting of user strings)."""
    console.print(message, markup=False, emoji=False, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True, emoji=False)


def fault(e: BaseException) -> str | None:
    """The one-line message of a machine fault (disk full, read-only, permission), or None for anything else."""
    code = getattr(e, "errno", None)
    if code not in FAULTS:
        code = next((c for text, c in FAULT_TEXTS.items() if text in str(e)), None)
    if code is None:
        return None
    where = getattr(e, "filename", None)
    return f"{where}: {FAULTS[code]}" if where else f"{FAULTS[code]} ({first_line(e)})"


def user_errors(fn):
    """Turn a UserError, or a fault of the machine, into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except Exception as e:
            message = fault(e)
            if message is None:
                raise
            error_line(message)
            raise typer.Exit(2) from None

    return wrapper


# The input versions each command reads (`--input stage=vNNN`); a pin of anything else is a mistake.
READS = {
    "sample": ("prompts",),
    "score": ("samples", "prompts"),
    "build": ("prompts", "samples", "scores"),
    "sft": ("datasets",),
    "dpo": ("datasets", "sft"),
    "eval": ("sft", "dpo"),
}


def parse_inputs(items: list[str] | None, verb: str) -> dict[str, str]:
    pinned = {}
    for item in items or []:
        stage, sep, version = item.partition("=")
        if not sep or not stage or not version:
            raise UserError(f"--input {item!r}: expected stage=vNNN")
        if verb in READS and stage.strip() not in READS[verb]:  # `report` checks its own pins
            only = "only " if len(READS[verb]) == 1 else ""
            raise UserError(f"--input {stage.strip()}=...: {verb} reads {only}{', '.join(READS[verb])}")
        pinned[stage.strip()] = version.strip()
    return pinned


def _load(config: Path, overrides: list[str] | None):
    from fusechat.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return load_config(config, overrides)


def _store(cfg):
    from fusechat.store import RunStore

    return RunStore(cfg.run_dir)


@contextmanager
def stage_progress(verb: str) -> Iterator[Any]:
    """The progress display of a long stage, yielding the callback that stage reports to (None for others)."""
    if verb not in ("prompts", "sample", "score", "build"):
        yield None
        return
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}", markup=False)]  # source names as is
    if verb != "prompts":
        columns += [BarColumn(), MofNCompleteColumn()]
    if verb == "sample":
        columns.append(TextColumn("{task.fields[rate]}", markup=False))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=verb in ("prompts", "build")) as bar:
        tasks: dict[str, Any] = {}

        def task(name: str, total: int | None = None, **fields: Any) -> Any:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, **fields)
            return tasks[name]

        if verb == "prompts":

            def progress(source: str, rows: int) -> None:
                bar.update(task(source), description=f"{source}: {rows:,} rows read")
        elif verb == "sample":

            def progress(name: str, done: int, total: int, tokens: int, seconds: float) -> None:
                rate = f"{tokens:,} tokens, {tokens / seconds:,.0f} tok/s" if seconds else ""
                bar.update(task(name, total, rate=rate), completed=done, total=total, rate=rate)
        elif verb == "score":

            def progress(done: int, total: int) -> None:
                bar.update(task("scoring responses", total), completed=done, total=total)
        else:

            def progress(phase: str, done: int, total: int) -> None:
                bar.update(task(phase, total), completed=done, total=total)

        yield progress


@app.command()
@user_errors
def prompts(config: ConfigOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Ingest the configured prompt sources: map fields, drop excluded (a category column or the code/math rule),
    empty and duplicate prompts, take each source's seeded sample (`limit`, `stratify`), split sft/dpo."""
    from fusechat.prompts import run_prompts

    cfg = _load(config, set_)
    with stage_progress("prompts") as progress:
        version = run_prompts(cfg, _store(cfg), force=force, log=say, progress=progress)
    by_domain = version.manifest["counts"].get("by_domain", {})
    for domain, splits in by_domain.items():
        say(f"  {domain}: " + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())))
    for source, counts in version.manifest["counts"].get("by_source", {}).items():
        say(f"  {source}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for source, strata in version.manifest["counts"].get("strata", {}).items():
        say(
            f"  {source} kept/available per stratum: "
            + ", ".join(f"{k}={v['kept']}/{v['available']}" for k, v in strata.items())
        )


@app.command()
@user_errors
def status(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Show every stage's versions: counts, creation time, inputs (lineage); broken ones; and the partial folders,
    how far each is and whether a live job works in it (else: abandoned, see `fusechat clean`)."""
    from fusechat.config import load_config
    from fusechat.status import status_table

    cfg = load_config(config, set_, check_trl=False)
    console.print(status_table(_store(cfg)))


@app.command()
@user_errors
def clean(
    config: ConfigOpt,
    stage: Annotated[
        list[str] | None, typer.Option("--stage", help="Only this stage's folders (prompts, samples, ...; repeatable).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
    set_: SetOpt = None,
) -> None:
    """Remove the partial folders and unfinished samples parts of interrupted runs that no live job works in
    (their finished chunks and checkpoints are lost: a re-run starts them over). Complete versions and complete
    parts are never touched."""
    from fusechat.config import load_config
    from fusechat.status import clean as clean_partials
    from fusechat.status import human_bytes
    from fusechat.store import STAGES

    cfg = load_config(config, set_, check_trl=False)
    unknown = [s for s in stage or [] if s not in STAGES]
    if unknown:
        raise UserError(f"--stage {unknown[0]}: expected one of {', '.join(STAGES)}")
    store = _store(cfg)
    removed = clean_partials(store, stage or None, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for _, path, size in removed:
        say(f"{verb}: {path.relative_to(store.root).as_posix()} ({human_bytes(size)})")
    total = human_bytes(sum(size for *_, size in removed))
    say(f"{verb} {len(removed)} abandoned partial folder(s), {total}" if removed else "nothing to clean")


@app.command()
@user_errors
def sft(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Fine-tune the target on a datasets version (TRL SFTTrainer; loss on the assistant turn only).
    `sft.num_processes` / `sft.accelerate_config` relaunch it under `accelerate launch`."""
    from fusechat.train.sft import run_sft

    cfg = _load(config, set_)
    _show_training(run_sft(cfg, _store(cfg), pinned=parse_inputs(input_, "sft"), force=force, log=say))


@app.command()
@user_errors
def dpo(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """DPO from the latest (or --input sft=vNNN) sft model on a datasets version (TRL DPOTrainer)."""
    from fusechat.train.dpo import run_dpo

    cfg = _load(config, set_)
    _show_training(run_dpo(cfg, _store(cfg), pinned=parse_inputs(input_, "dpo"), force=force, log=say))


def _show_training(version) -> None:
    if version is None:
        return
    train = version.manifest.get("train", {})
    shown = ("world_size", "effective_batch", "global_step", "final_loss", "mean_loss", "reward_accuracy")
    shown += ("reward_margin", "tokens_per_s")
    say(
        "  "
        + ", ".join(
            f"{k}={train[k]:.4g}" if isinstance(train[k], float) else f"{k}={train[k]}"
            for k in shown
            if train.get(k) is not None
        )
    )
    say(f"  model: {version.path / 'model'}")
    kept = version.manifest.get("checkpoints")
    if kept:
        say(f"  checkpoints: {', '.join(kept)} (fusechat eval --model {version.ref}@{kept[-1]})")


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
    """Each source model answers each prompt k times (vLLM or transformers; `engine: dataset` takes a prompt
    source's own answers), in resumable chunks. Each source's samples are a part of their own, reused (cached) while
    that source's settings and model are unchanged. Jobs with --source/--shard fill the parts together; the version
    completes when every chunk exists. Samples on every GPU the job is given: one engine replica per
    tensor_parallel_size GPUs (sources[].replicas), the same samples at any count."""
    from fusechat.sample import run_sample
    from fusechat.shards import ShardSpec

    spec = ShardSpec.parse(shard)
    cfg = _load(config, set_)
    with stage_progress("sample") as progress:
        version = run_sample(
            cfg,
            _store(cfg),
            pinned=parse_inputs(input_, "sample"),
            force=force,
            source=source,
            shard=spec,
            log=say,
            progress=progress,
        )
    if version is not None:
        counts = version.manifest["counts"]
        timings = version.manifest["timings"].get("by_source", {})
        for name, c in counts.get("by_source", {}).items():
            rate = timings.get(name, {}).get("tokens_per_s", 0)
            say(
                f"  {name}: prompts={c.get('prompts', 0)} samples={c.get('samples', 0)} "
                f"tokens={c.get('tokens', 0)} skipped_too_long={c.get('skipped_too_long', 0)} "
                f"identical_prompts={c.get('identical_prompts', 0)} tok/s={rate:,.0f}"
            )


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
    Jobs with --shard fill one version together; it completes when every chunk exists. Scores on every GPU the job
    is given (one process each); --shard jobs started by hand on one machine split its GPUs."""
    from fusechat.score.stage import run_score
    from fusechat.shards import ShardSpec

    spec = ShardSpec.parse(shard)
    cfg = _load(config, set_)
    with stage_progress("score") as progress:
        version = run_score(
            cfg,
            _store(cfg),
            pinned=parse_inputs(input_, "score"),
            force=force,
            shard=spec,
            log=say,
            progress=progress,
        )
    if version is not None:
        counts, timings = version.manifest["counts"], version.manifest["timings"].get("scorers", {})
        say(f"  responses={counts.get('responses', 0)} truncated={counts.get('truncated', 0)}")
        for verdict, n in counts.get("by_verdict", {}).items():
            say(f"  {verdict}: {n}")  # plain: "reward:ok:" is no emoji
        for name, t in timings.items():
            say(f"  {name}: {t['responses']} responses, {t['responses_per_s']} responses/s")


@app.command()
@user_errors
def build(config: ConfigOpt, input_: InputOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Select the SFT set (best response over all sources) and the DPO set (best vs worst of one source, reward
    gap inside build.margin) from a scores version, among responses that fit build.max_length in the target's tokens
    (or cut to fit: build.over_length); prints what was kept and dropped."""
    import json

    from fusechat.build import run_build, stats_tables

    cfg = _load(config, set_)
    with stage_progress("build") as progress:
        version = run_build(
            cfg, _store(cfg), pinned=parse_inputs(input_, "build"), force=force, log=say, progress=progress
        )
    stats = json.loads((version.path / "stats.json").read_text())
    for table in stats_tables(stats):
        console.print(table)
    say(f"  sft: {version.path / 'sft'}  dpo: {version.path / 'dpo'}")


@app.command("eval")
@user_errors
def eval_(
    config: ConfigOpt,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="dpo, sft, target, a source name, or a model directory; dpo/v003 or dpo/v003@step-200 for a "
            "version or one of its checkpoints. Default: the latest dpo model, else sft, else target. With "
            "--compare: repeatable (also eval/vNNN); default every evaluated model.",
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Print one table of the models' scores so far; evaluate nothing.")
    ] = False,
    no_judge: Annotated[
        bool, typer.Option("--no-judge", help="Skip the judge step even if eval.judge is set.")
    ] = False,
    input_: InputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """One model answers every benchmark of `eval` whose file exists: local sets checked here (accuracy, pass@1),
    judged benchmarks as answer files for their harnesses (and graded when `eval.judge` is set)."""
    from fusechat.eval.compare import comparison, pick_evals, scores_of
    from fusechat.eval.stage import run_eval

    cfg = _load(config, set_)
    store = _store(cfg)
    if compare:
        picked = pick_evals(store, model)
        console.print(comparison_table(comparison([(label, scores_of(v)) for label, v in picked]), cfg.name))
        return
    if model and len(model) > 1:
        raise UserError("--model: one model per evaluation (several only with --compare)")
    version = run_eval(
        cfg,
        store,
        model=model[0] if model else None,
        pinned=parse_inputs(input_, "eval"),
        force=force,
        judge=not no_judge,
        log=say,
    )
    counts = version.manifest["counts"]
    title = f"{counts['model']} ({version.ref})"
    console.print(comparison_table(comparison([(counts["model"], scores_of(version))]), title))
    for name, info in counts.get("judged", {}).items():
        say(f"  {name} answers: {version.path / info['file']}")


def comparison_table(table, title: str) -> Table:
    """A comparison (benchmarks as rows, models as columns, deltas) as a rich table."""
    out = Table(title=escape(title))
    for i, name in enumerate(table["header"]):
        out.add_column(escape(str(name)), justify="left" if i == 0 else "right")

    def cell(value, delta: bool) -> str:
        if value is None:
            return "-"
        return f"{value:+.1f}" if delta else f"{value:.1f}" if isinstance(value, float) else str(value)

    rows = table["rows"] + ([table["average"]] if table["average"] else [])
    for r, row in enumerate(rows):
        cells = [escape(cell(v, i > table["models"])) for i, v in enumerate(row)]  # labels may hold [...]
        if r == len(table["rows"]):
            cells = [f"[bold]{c}[/bold]" for c in cells]
        out.add_row(*cells)
    return out


@app.command()
@user_errors
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    until: Annotated[str, typer.Option("--until", help="Stop after this stage.")] = "eval",
) -> None:
    """Every stage in order (prompts, sample, score, build, sft, dpo, eval), each skipped when cached; stops at
    the first error with the stage named. Evaluates the target before fusion, after SFT and after DPO, and prints
    the scores and deltas per benchmark. Ends by writing the run's report.html (see `fusechat report`)."""
    from fusechat.eval.compare import comparison, fusion_columns
    from fusechat.pipeline import run_pipeline

    cfg = _load(config, set_)
    versions = run_pipeline(cfg, _store(cfg), until=until, log=say, progress_for=stage_progress)
    say("done: " + ", ".join(v.ref for v in versions.values()))
    evals = {k.removeprefix("eval:"): v for k, v in versions.items() if k.startswith("eval:")}
    if evals:
        table = comparison(fusion_columns(evals), deltas=True)
        console.print(comparison_table(table, f"{cfg.name}: the target before and after fusion"))
    from fusechat.report import report_after_run

    path = report_after_run(_store(cfg), say)
    if path is not None:
        say(f"report: {path} (open it in a browser)")


@app.command()
@user_errors
def report(
    config: ConfigOpt,
    input_: InputOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of <run dir>/report.html.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Write report.html in the run directory: one self-contained page (plots embedded, no network) of prompts,
    rewards, winners, DPO margins, drops, training curves, evaluation and lineage, read from the versions on disk.
    Shows the latest dpo version and what it was made from, unless --input pins versions."""
    from fusechat.config import load_config
    from fusechat.report import write_report

    cfg = load_config(config, set_, check_trl=False)
    say(f"report: {write_report(_store(cfg), pinned=parse_inputs(input_, 'report'), out=output)}")


@app.command()
@user_errors
def demo(
    seed: Annotated[int, typer.Option("--seed", help="Seed of the world and of the run.")] = 0,
    small: Annotated[bool, typer.Option("--small", help="A smaller, quicker world (fusion is weaker).")] = False,
    set_: SetOpt = None,
) -> None:
    """Build the tiny demo world under runs/ (cached) and run the whole pipeline on it on CPU: three specialist
    sources, a weak target, SFT then DPO; prints held-out accuracy per skill for every model and writes
    runs/demo/report.html."""
    from fusechat.demo.run import run_demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the demo's tiny engines start three times
    result = run_demo(seed=seed, small=small, overrides=set_ or [], log=say, progress_for=stage_progress)
    console.print(results_table(result))
    say("(also written to runs/demo/results.md)")
    if result.get("report"):
        say(f"report: {result['report']} (open it in a browser)")


def results_table(result) -> Table:
    skills = result["skills"]
    table = Table(title="held-out accuracy per skill (greedy)")
    table.add_column("model")
    for s in skills:
        table.add_column(s, justify="right")
    table.add_column("mean", justify="right")
    for r in result["rows"]:
        table.add_row(r["model"], *(f"{r['accuracy'][s]:.2f}" for s in skills), f"[bold]{r['mean']:.2f}[/bold]")
    contrib = Table(title="what each source contributed")
    for col in ("source", "SFT rows won", "DPO pairs"):
        contrib.add_column(col)
    for name, c in result["contributions"].items():
        contrib.add_row(name, str(c["sft_rows"]), str(c["dpo_pairs"]))
    grid = Table.grid(padding=1)
    grid.add_row(table)
    grid.add_row(contrib)
    return grid


# `fusechat --help` lists the commands in pipeline order, whatever order they are defined in.
_ORDER = ["prompts", "sample", "score", "build", "sft", "dpo", "eval", "run", "status", "clean", "report", "demo"]
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))


def main() -> None:
    try:
        app(prog_name="fusechat")
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
