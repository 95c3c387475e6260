"""`fusechat run`: every stage in order, each a cache hit when its inputs and config are unchanged, stopping at
the first error with the stage named. Its eval step evaluates the target before fusion, after SFT and after DPO
(returned as `eval:target`, `eval:sft`, `eval:dpo`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from fusechat.config import FusechatConfig
from fusechat.errors import UserError
from fusechat.store import RunStore, Version

# The stages in pipeline order, by CLI verb.
STAGES = ("prompts", "sample", "score", "build", "sft", "dpo", "eval")

# A stage's progress display: given the verb, a context manager yielding the stage's progress callback (or None).
ProgressFor = Callable[[str], AbstractContextManager[Any]]


def run_stage_by_name(
    verb: str,
    cfg: FusechatConfig,
    store: RunStore,
    *,
    force: bool,
    log: Callable[[str], None],
    progress: Any = None,
) -> Version | None:
    if verb == "prompts":
        from fusechat.prompts import run_prompts

        return run_prompts(cfg, store, force=force, log=log, progress=progress)
    if verb == "sample":
        from fusechat.sample import run_sample

        return run_sample(cfg, store, force=force, log=log, progress=progress)
    if verb == "score":
        from fusechat.score.stage import run_score

        return run_score(cfg, store, force=force, log=log, progress=progress)
    if verb == "build":
        from fusechat.build import run_build

        return run_build(cfg, store, force=force, log=log, progress=progress)
    if verb == "sft":
        from fusechat.train.sft import run_sft

        return run_sft(cfg, store, force=force, log=log)
    if verb == "dpo":
        from fusechat.train.dpo import run_dpo

        return run_dpo(cfg, store, force=force, log=log)
    raise ValueError(f"unknown stage {verb!r}")


def run_pipeline(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    until: str = "eval",
    force: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
    progress_for: ProgressFor = lambda verb: nullcontext(),
) -> dict[str, Version]:
    """Run prompts .. `until` (eval runs only when benchmarks are configured and a file of theirs exists)."""
    from fusechat.eval.stage import configured, evaluate_models, fusion_models

    if until not in STAGES:
        raise UserError(f"--until {until}: expected one of {', '.join(STAGES)}")
    done: dict[str, Version] = {}
    for verb in STAGES:
        if verb == "eval":
            if not configured(cfg):
                log("eval: skipped (no eval.sets or eval.judged configured)")
                break
            log("── eval")
            try:
                evals = evaluate_models(cfg, store, fusion_models(cfg), log=log)
            except UserError as e:
                raise UserError(f"stage eval: {e}") from None
            done.update({f"eval:{model}": v for model, v in evals.items()})
            break
        log(f"── {verb}")
        try:
            with progress_for(verb) as progress:
                version = run_stage_by_name(verb, cfg, store, force=verb in force, log=log, progress=progress)
        except UserError as e:
            raise UserError(f"stage {verb}: {e}") from None
        if version is None:
            raise UserError(f"stage {verb}: did not complete (parts missing)")
        done[verb] = version
        if verb == until:
            break
    return done
