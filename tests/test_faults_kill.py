"""The fault suite, part 1: SIGKILL at chosen moments. Each stage of the small pipeline (tests/fault_world.py) runs as
a CLI process in a copy of the clean run, is killed (its whole process group) as soon as a file shows it reached
the moment (a partial folder, the n-th chunk of a samples part or of a scores version, a checkpoint, the final
model), then re-run to the end. The result must equal the clean run: the same data files byte for byte (0 rows
lost, duplicated or differing), the same samples parts, the same counts in the manifest, and for training the
configured last step with the clean run's weights and whole-run loss and token counts. One samples case starts
with two sources' parts already complete (reused, not sampled again) and is killed while the third fills. Runs are
killed 5 at a time to share the start-up cost; each runs in slices once it started work (`fault_world.kill_all`),
so a kill lands within milliseconds of its moment, which each case checks.
Hardware: CPU (it asserts bit-identical results, which GPU kernels need not give; skipped where a GPU is visible).
"""

from __future__ import annotations

import pytest
from fault_world import (
    DPO_STEPS,
    SFT_STEPS,
    Kill,
    committed,
    count,
    data_files,
    exists,
    kill_all,
    part_chunks,
    record,
    resume,
    saved,
    start,
    tally,
    weights_diff,
)

pytestmark = [pytest.mark.slow, pytest.mark.cpu_only]

# Samples: 18 chunks in three parts (llama 8, qwen 8, answers 2); scores: 22 chunks (one per samples file and range).
REUSED = {"parts": ("llama", "answers")}  # the case starts with these parts complete: only qwen's is sampled
KILLS = {
    "samples": [
        ("loading the engines", exists("samples")),
        ("after the first chunk", part_chunks(1)),
        ("after 5 of 18 chunks", part_chunks(5)),
        ("first source done, second not started", part_chunks(8, "llama")),
        ("after the last chunk, before the commit", part_chunks(18)),
        ("right after the commit", committed("samples")),
        ("two parts reused, the third after 3 of its 8 chunks", part_chunks(3, "qwen"), REUSED),
    ],
    "scores": [
        ("loading the reward model", exists("scores")),
        ("after the first chunk", count("data/*.parquet", 1, "scores")),
        ("after 11 of 22 chunks", count("data/*.parquet", 11, "scores")),
        ("after the last chunk, before the commit", count("data/*.parquet", 22, "scores")),
    ],
    "datasets": [
        ("reading the scores", exists("datasets")),
        ("after writing the SFT set", exists("datasets", "sft/train.parquet")),
        ("after writing stats.json, before the commit", exists("datasets", "stats.json")),
    ],
    "sft": [
        ("loading the model", exists("sft")),
        ("saving the first checkpoint", exists("sft", "checkpoints/checkpoint-5")),
        ("after the first checkpoint", saved("sft", "checkpoint-5")),
        ("saving the last checkpoint", exists("sft", f"checkpoints/checkpoint-{SFT_STEPS}")),
        ("after the last checkpoint", saved("sft", f"checkpoint-{SFT_STEPS}")),
        ("saving the final model", exists("sft", "model")),
        ("after the final model, before the commit", exists("sft", ".result.json")),
    ],
    "dpo": [
        ("after the first checkpoint", saved("dpo", "checkpoint-3")),
        ("after the second checkpoint, kept as step-6", exists("dpo", "checkpoints/step-6")),
        ("after the last checkpoint", saved("dpo", f"checkpoint-{DPO_STEPS}")),
        ("saving the final model", exists("dpo", "model")),
    ],
}
# The step a resumed training run must start from: the checkpoint complete at the kill (a checkpoint killed while
# saving is skipped); a run killed after its result was written commits it (its own run started at 0).
RESUMED_FROM = {
    "sft": [0, 0, 5, 5, SFT_STEPS, SFT_STEPS, 0],
    "dpo": [3, 6, DPO_STEPS, DPO_STEPS],
}
CASES = [(stage, i) for stage, kills in KILLS.items() for i in range(len(kills))]


@pytest.fixture(scope="module")
def killed(fault_world, tmp_path_factory):
    """Every kill point's run, started 5 at a time and killed at its moment; by (stage, index)."""
    out: dict[tuple[str, int], Kill] = {}
    batch: list[Kill] = []
    for stage, i in CASES:
        name, ready, *more = KILLS[stage][i]
        kill = Kill(f"{stage}: {name}", stage, ready, extra=dict(*more))
        folder = tmp_path_factory.mktemp(f"kill-{stage}-{i}")
        kill.folder = fault_world.case(folder, stage, parts=kill.extra.get("parts", ()))
        batch.append(kill)
        out[(stage, i)] = kill
        if len(batch) == 5 or (stage, i) == CASES[-1]:
            for k in batch:
                start(k)
            kill_all(batch)
            batch = []
    return out


@pytest.mark.parametrize(("stage", "index"), CASES, ids=[f"{s}-{KILLS[s][i][0]}" for s, i in CASES])
def test_killed_run_resumes_to_the_clean_result(stage, index, killed, fault_world):
    kill = killed[(stage, index)]
    assert kill.killed or kill.proc.returncode == 0, f"{kill.name}: exited {kill.proc.returncode}\n{kill.output}"
    store_dir = kill.run_dir / stage
    # nothing half-written is visible, whatever the moment (samples parts are checked chunk by chunk on reuse)
    visible = [p.name for p in store_dir.iterdir() if not p.name.startswith(".")] if store_dir.is_dir() else []
    assert sorted(set(visible) - {"parts"}) in ([], ["v001"]), visible
    clean = fault_world.clean(stage)

    logs: list[str] = []
    version = resume(kill.folder, stage, log=logs.append)
    assert version.name == "v001"
    assert not [p for p in store_dir.iterdir() if p.name.startswith((".partial-", ".tmp-"))]
    assert version.manifest["counts"] == clean.manifest["counts"]
    assert version.manifest["files"] == clean.manifest["files"]
    got, want = data_files(version.path), data_files(clean.path)
    assert sorted(got) == sorted(want)
    differing_files = sorted(name for name in want if got[name] != want[name])
    outcome = {"landed": kill.landed, "killed": kill.killed, "differing_files": differing_files}
    if stage in ("sft", "dpo"):
        train, clean_train = version.manifest["train"], clean.manifest["train"]
        outcome.update(
            global_step=train["global_step"],
            resumed_from_step=train["resumed_from_step"],
            max_weight_diff=weights_diff(version.path / "model", clean.path / "model"),
        )
        record(kill.name, outcome)
        assert train["resumed_from_step"] == RESUMED_FROM[stage][index], kill.landed  # the kill landed on its moment
        assert train["global_step"] == (SFT_STEPS if stage == "sft" else DPO_STEPS)
        assert outcome["max_weight_diff"] == 0.0
        assert train["tokens"] == clean_train["tokens"]
        assert train["train_loss"] == pytest.approx(clean_train["train_loss"], rel=1e-6)
        assert train["mean_loss"] == pytest.approx(clean_train["mean_loss"], rel=1e-9)
        assert version.manifest.get("checkpoints") == clean.manifest.get("checkpoints")
    else:
        assert kill.landed.startswith("committed" if "after the commit" in kill.name else "partial"), kill.landed
        outcome.update(tally(stage, clean.path, version.path))
        record(kill.name, outcome)
        assert (outcome["lost"], outcome["duplicated"], outcome["differing"], outcome["extra"]) == (0, 0, 0, 0)
    for source in kill.extra.get("parts", ()):  # reused: not sampled again, neither by the killed run nor after
        for output in (kill.output, "\n".join(logs)):
            assert f"{source}: cached (samples/parts/{source}-" in output and f"{source}: loading" not in output
    if stage == "samples":  # the parts the version links hold the clean run's bytes
        assert parts_files(kill.run_dir) == parts_files(fault_world.run_dir)
    assert differing_files == [], outcome


def parts_files(run_dir) -> dict[str, bytes]:
    return data_files(run_dir / "samples" / "parts")
