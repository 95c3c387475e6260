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


def main() -> None:
    try:
        app(prog_name="fusechat")
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
