"""The fault suite, part 2: bad inputs and a failing machine. Every bad input (config values, command-line
arguments, input files, damaged versions, a busy or unusable workdir) must exit with code 2 and print exactly one
line on stderr that names the culprit, before any model loads, and leave nothing visible behind (no new version,
no partial folder). Then the machine's faults: a full disk (a small tmpfs where this process may mount one, else
an ENOSPC raised at the write boundary), a read-only workdir, damaged chunks in a partial folder (redone with a
warning), a broken manifest. Runs in this process through Typer's CliRunner, on a copy of the small pipeline's
clean run (tests/fault_world.py). Hardware: any."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fault_world import NAME, data_files, record, tally
from typer.testing import CliRunner

from fusechat.cli import app
from fusechat.store import RunStore

pytestmark = pytest.mark.slow
STAGES = ("prompts", "samples", "scores", "datasets", "sft", "dpo")


def visible(run_dir: Path) -> dict[str, list[str]]:
    """Versions and partial folders of every stage (what a user or a later stage could see or resume)."""
    out = {}
    for stage in STAGES:
        d = run_dir / stage
        if d.is_dir():
            out[stage] = sorted(p.name for p in d.iterdir() if p.is_dir())
    return out


def invoke(folder: Path, argv: list[str], monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "250"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def mutate(config: dict, path: str, value) -> dict:
    """A deep copy of `config` with `a.b.0.c` set to `value`."""
    config = json.loads(json.dumps(config))
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return config


# ------------------------------------------------------------------------------------------------ case setups
# Each returns the folder's config (or None to keep the world's) after preparing files; `f` is the case folder.
def dup_key(f, w):
    (f / "cfg.yaml").write_text(yaml.safe_dump(w.config, sort_keys=False) + "seed: 12\n")


def invalid_yaml(f, w):
    (f / "cfg.yaml").write_text("name: [unclosed\n")


def prompt_file(content: bytes, name: str = "p.jsonl", field: str | None = None):
    def setup(f, w):
        (f / name).write_bytes(content)
        config = mutate(w.config, "prompts.sources.0.path", str(f / name))
        return mutate(config, "prompts.sources.1.path", str(f / name)) if field is None else config

    return setup


def no_sources(f, w):
    return mutate(w.config, "prompts.sources", [])


def all_k_zero(f, w):
    config = mutate(w.config, "sources.0.samples", {"chat": 0, "math": 0})
    return mutate(config, "sources.1.samples", {"chat": 0, "math": 0})


def break_manifest(stage: str, text: str):
    def setup(f, w):
        (f / "runs" / NAME / stage / "v001" / "manifest.json").write_text(text)

    return setup


def damage(stage: str, rel: str, how: str):
    def setup(f, w):
        target = f / "runs" / NAME / stage / "v001" / rel
        if how == "delete":
            target.unlink()
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[:-64])
        elif how == "stray":
            pq.write_table(pa.table({"x": [1]}), target)
        elif how == "rows":
            table = pq.read_table(target)
            pq.write_table(table.slice(0, table.num_rows - 1), target)

    return setup


def workdir_is_a_file(f, w):
    (f / "afile").write_text("x")
    return mutate(w.config, "workdir", "afile")


def workdir_under_a_file(f, w):
    (f / "afile").write_text("x")
    return mutate(w.config, "workdir", "afile/runs")


def nothing_acceptable(f, w):
    return mutate(w.config, "build.verified_domains", {"chat": "exact", "math": "exact"})


# (id, stages copied from the clean run, setup, argv, what the one line must contain)
CASES = [
    # the config file
    ("duplicate YAML key", [], dup_key, ["prompts"], "key 'seed' appears twice"),
    ("invalid YAML", [], invalid_yaml, ["prompts"], "cfg.yaml: line 2 invalid YAML"),
    ("missing config", [], None, ["prompts", "-c", "nope.yaml"], "nope.yaml: config file not found"),
    ("config path with brackets", [], None, ["prompts", "-c", "cfg[1].yaml"], "cfg[1].yaml: config file not found"),
    ("--set without =", [], None, ["prompts", "--set", "seed"], "--set 'seed': expected key.path=value"),
    (
        "unknown key",
        [],
        None,
        ["prompts", "--set", "build.marjin=1"],
        "build.marjin: unknown key; did you mean margin?",
    ),
    ("run name with a slash", [], None, ["prompts", "--set", "name=a/b"], "name: must be a plain directory name"),
    # sampling ranges, samples per domain
    (
        "negative temperature",
        [],
        None,
        ["sample", "--set", "sources.0.sampling.temperature=-1"],
        "sources[0].sampling.temperature: Input should be greater than or equal to 0",
    ),
    (
        "top_p above 1",
        [],
        None,
        ["sample", "--set", "sources.1.sampling.top_p=2.0"],
        "sources[1].sampling.top_p: Input should be less than or equal to 1",
    ),
    (
        "top_p of 0",
        [],
        None,
        ["sample", "--set", "sources.0.sampling.top_p=0"],
        "sources[0].sampling.top_p: Input should be greater than 0",
    ),
    (
        "max_tokens of 0",
        [],
        None,
        ["sample", "--set", "sources.0.sampling.max_tokens=0"],
        "sources[0].sampling.max_tokens: Input should be greater than or equal to 1",
    ),
    ("top_k below -1", [], None, ["sample", "--set", "sources.0.sampling.top_k=-5"], "sources[0].sampling.top_k"),
    (
        "repetition_penalty of 0",
        [],
        None,
        ["sample", "--set", "sources.0.sampling.repetition_penalty=0"],
        "sources[0].sampling.repetition_penalty",
    ),
    (
        "negative samples per domain",
        [],
        None,
        ["sample", "--set", "sources.0.samples.math=-2"],
        "sources[0].samples.math: Input should be greater than or equal to 0",
    ),
    (
        "non-integer samples per domain",
        [],
        None,
        ["sample", "--set", "sources.0.samples.math=two"],
        "sources[0].samples.math: Input should be a valid integer",
    ),
    ("chunk_size of 0", [], None, ["sample", "--set", "sources.0.chunk_size=0"], "sources[0].chunk_size"),
    ("score shard_size of 0", [], None, ["score", "--set", "score.shard_size=0"], "score.shard_size"),
    # TRL values by type and range
    (
        "learning_rate abc",
        [],
        None,
        ["sft", "--set", "sft.learning_rate=abc"],
        'sft.learning_rate: expected a number (got "abc")',
    ),
    ("beta high", [], None, ["dpo", "--set", "dpo.beta=high"], 'dpo.beta: expected a number (got "high")'),
    ("beta of 0", [], None, ["dpo", "--set", "dpo.beta=0"], "dpo.beta: expected > 0 (got 0)"),
    (
        "max_steps -5",
        [],
        None,
        ["sft", "--set", "sft.max_steps=-5"],
        "sft.max_steps: expected -1 (train by num_train_epochs) or a number of steps >= 1 (got -5)",
    ),
    (
        "batch size 0",
        [],
        None,
        ["sft", "--set", "sft.per_device_train_batch_size=0"],
        "sft.per_device_train_batch_size: expected >= 1 (got 0)",
    ),
    ("epochs abc", [], None, ["sft", "--set", "sft.num_train_epochs=abc"], "sft.num_train_epochs: expected a number"),
    ("bf16 maybe", [], None, ["sft", "--set", "sft.bf16=maybe"], "sft.bf16: expected true/false or null"),
    (
        "lora r of 0",
        [],
        None,
        ["sft", "--set", "sft.lora.r=0"],
        "sft.lora.r: Input should be greater than or equal to 1",
    ),
    (
        "TRL key misspelled",
        [],
        None,
        ["dpo", "--set", "dpo.bta=0.1"],
        "dpo.bta: unknown key (not a field of TRL's DPOConfig); did you mean beta?",
    ),
    (
        "margin upside down",
        [],
        None,
        ["build", "--set", "build.margin=[0.5, 0.1]"],
        "build.margin: expected [low, high] with 0 <= low <= high (got [0.5, 0.1])",
    ),
    (
        "build max_length 0",
        [],
        None,
        ["build", "--set", "build.max_length=0"],
        "build.max_length: Input should be greater than or equal to 1",
    ),
    # command-line arguments
    (
        "pin of a stage sample does not read",
        ["prompts"],
        None,
        ["sample", "--input", "scores=v001"],
        "--input scores=...: sample reads only prompts",
    ),
    (
        "pin of a stage sft does not read",
        [],
        None,
        ["sft", "--input", "samples=v001"],
        "--input samples=...: sft reads only datasets",
    ),
    (
        "pin of a stage score does not read",
        [],
        None,
        ["score", "--input", "datasets=v001"],
        "--input datasets=...: score reads samples, prompts",
    ),
    ("pin without a version", [], None, ["sample", "--input", "prompts"], "--input 'prompts': expected stage=vNNN"),
    ("pinned version missing", ["prompts"], None, ["sample", "--input", "prompts=v009"], "--input prompts=v009: "),
    (
        "shard out of range",
        ["prompts"],
        None,
        ["sample", "--shard", "3/2"],
        "--shard '3/2': expected I/N with 1 <= I <= N",
    ),
    (
        "unknown source",
        ["prompts"],
        None,
        ["sample", "--source", "nope"],
        "--source nope: not in the config's sources (llama, qwen)",
    ),
    ("no complete input", [], None, ["score"], "no complete samples version in runs/f"),
    # input files
    ("empty prompt file", [], prompt_file(b""), ["prompts"], "prompts.sources[0].path: "),
    ("empty prompt file with brackets", [], prompt_file(b"", "p[1].jsonl"), ["prompts"], "p[1].jsonl: no records"),
    ("no prompt sources", [], no_sources, ["prompts"], "prompts.sources: empty; list at least one prompt dataset"),
    (
        "non-UTF-8 prompt file",
        [],
        prompt_file(b'{"q": "ok", "kind": "chat"}\n{"q": "caf\xe9", "kind": "chat"}\n'),
        ["prompts"],
        "p.jsonl:2: not UTF-8 text (byte 0xe9",
    ),
    (
        "malformed JSON line",
        [],
        prompt_file(b'{"q": "ok", "kind": "chat"}\n{"q": \n'),
        ["prompts"],
        "p.jsonl:2: malformed JSON line",
    ),
    (
        "truncated Parquet prompt file",
        [],
        prompt_file(b"PAR1\x00\x00garbage", "p.parquet"),
        ["prompts"],
        "p.parquet: not a readable Parquet file",
    ),
    ("missing prompt file", [], prompt_file(b"", "gone.jsonl"), ["prompts"], None),  # setup removes it below
    ("no source answers any prompt", ["prompts"], all_k_zero, ["sample"], "sources: no source answers any prompt"),
    (
        "nothing acceptable to build",
        ["prompts", "samples", "scores"],
        nothing_acceptable,
        ["build"],
        "build: scores/v001 yields no SFT row and no DPO pair",
    ),
    # damaged versions
    (
        "broken manifest of the input",
        ["prompts"],
        break_manifest("prompts", '{"stage": "prompts", "fing'),
        ["sample"],
        "prompts/v001/manifest.json: unreadable manifest",
    ),
    (
        "manifest of another status",
        ["prompts"],
        break_manifest("prompts", '{"status": "running", "fingerprint": "x"}'),
        ["sample"],
        "prompts/v001/manifest.json: status 'running', expected 'complete'",
    ),
    (
        "chunk missing from the input",
        ["prompts", "samples"],
        damage("samples", "data/qwen-00003.parquet", "delete"),
        ["score"],
        "samples/v001/data/qwen-00003.parquet: missing (samples/v001 is damaged",
    ),
    (
        "chunk truncated in the input",
        ["prompts", "samples"],
        damage("samples", "data/llama-00001.parquet", "truncate"),
        ["score"],
        "samples/v001/data/llama-00001.parquet: ",
    ),
    (
        "chunk with rows lost",
        ["prompts", "samples", "scores"],
        damage("scores", "data/chunk-000002.parquet", "rows"),
        ["build"],
        "scores/v001/data/chunk-000002.parquet: ",
    ),
    (
        "stray file in the input",
        ["prompts", "samples", "scores"],
        damage("scores", "data/extra.parquet", "stray"),
        ["build"],
        "scores/v001/data/extra.parquet: not part of scores/v001",
    ),
    (
        "model file missing from the input",
        ["prompts", "samples", "scores", "datasets", "sft"],
        damage("sft", "model/model.safetensors", "delete"),
        ["dpo"],
        "sft/v001/model/model.safetensors: missing",
    ),
    # the workdir
    ("workdir is a file", ["prompts"], workdir_is_a_file, ["prompts"], "workdir: afile is a file, not a directory"),
    (
        "workdir under a file",
        ["prompts"],
        workdir_under_a_file,
        ["prompts"],
        "workdir: afile is a file, not a directory",
    ),
]


@pytest.fixture()
def folder(fault_world, tmp_path):
    return tmp_path


@pytest.mark.parametrize(("case", "upto", "setup", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    case, upto, setup, argv, message, fault_world, tmp_path, monkeypatch
):
    folder = tmp_path
    (folder / "cfg.yaml").write_text(yaml.safe_dump(fault_world.config, sort_keys=False))
    for stage in upto:
        shutil.copytree(fault_world.run_dir / stage, folder / "runs" / NAME / stage)
    config = setup(folder, fault_world) if setup else None
    if config is not None:
        (folder / "cfg.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if case == "missing prompt file":
        (folder / "gone.jsonl").unlink()
        message = f"prompts.sources[0].path: {folder / 'gone.jsonl'}: file not found"
    before = visible(folder / "runs" / NAME)
    command = argv[0]
    args = [*argv[1:]] if "-c" in argv else ["-c", "cfg.yaml", *argv[1:]]
    code, out, err = invoke(folder, [command, *args], monkeypatch)
    lines = err.strip().splitlines()
    record(f"bad input: {case}", {"exit": code, "stderr_lines": len(lines), "line": lines[:1]})
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert visible(folder / "runs" / NAME) == before


# ------------------------------------------------------------------------------------------------ the machine
def test_a_busy_stage_is_an_error_naming_the_holder(fault_world, tmp_path, monkeypatch):
    """One process per stage and workdir: a second `score` while one runs names the first (pid, host, command).
    Shard jobs of one version hold different job locks and work together (tests/test_sample_stage.py)."""
    folder = fault_world.case(tmp_path / "busy", "scores")
    store = RunStore(folder / "runs" / NAME)
    with store.job_lock("scores"):
        code, _, err = invoke(folder, ["score", "-c", "cfg.yaml"], monkeypatch)
        with store.job_lock("scores", "shard-2of2"):  # another job part of the same stage is a separate lock
            pass
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"another scores job is already running on runs/{NAME}: pid {os.getpid()} on " in err
    assert visible(folder / "runs" / NAME).get("scores", []) == []
    record("bad input: a busy stage", {"exit": code, "line": err.strip()})


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (yields True), or nothing where this process may not mount (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_is_one_line_and_the_rerun_finishes_the_version(fault_world, tmp_path, monkeypatch):
    """`sample` on a full disk: one line, exit 2, the finished chunks kept; with space again the same command
    completes the version, equal to the clean run."""
    with small_disk(tmp_path / "disk", "1m") as mounted:
        folder = fault_world.case(tmp_path / "disk" / "case", "samples")
        if mounted:
            filler = folder / "filler"
            free = shutil.disk_usage(folder).free
            filler.write_bytes(b"\0" * max(free - 24 * 1024, 0))  # room for a few chunks, not all 16
        else:  # no tmpfs here: the write boundary raises what a full disk raises, after 5 chunks
            import fusechat.shards as shards

            real, calls = shards.pq.write_table, []

            def write_table(table, where, *a, **kw):
                calls.append(where)
                if len(calls) > 5:
                    raise OSError(errno.ENOSPC, "No space left on device", str(where))
                return real(table, where, *a, **kw)

            monkeypatch.setattr(shards.pq, "write_table", write_table)
        code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml"], monkeypatch)
        lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # not transformers' progress bars
        record("fault: disk full", {"mounted": mounted, "exit": code, "line": lines[:1]})
        assert code == 2 and len(lines) == 1, err
        assert (
            lines[0].startswith("error: ")
            and "/data/" in lines[0]
            and ".parquet: no space left on the device" in lines[0]
        )
        partial = next((folder / "runs" / NAME / "samples").glob(".partial-*"))
        kept = len(list((partial / "data").glob("*.parquet")))
        assert 0 < kept < 16 and not list((partial / "data").glob(".*")), kept  # finished chunks kept, no temp
        assert visible(folder / "runs" / NAME)["samples"] == [partial.name]
        if mounted:
            (folder / "filler").unlink()
        else:
            monkeypatch.undo()
        code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml"], monkeypatch)
        assert code == 0, err
        assert f"{16 - kept} of" in out or "chunks to do" in out
        version = RunStore(folder / "runs" / NAME).latest("samples")
        assert data_files(version.path) == data_files(fault_world.clean("samples").path)


def test_read_only_workdir_is_one_line(fault_world, tmp_path, monkeypatch):
    with small_disk(tmp_path / "ro", "4m") as mounted:
        if not mounted and os.geteuid() == 0:
            pytest.skip("needs a read-only mount (root cannot be kept out of a directory by its mode)")
        folder = fault_world.case(tmp_path / "ro" / "case", "scores")
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
        else:
            for d in (folder / "runs" / NAME, *(folder / "runs" / NAME).iterdir()):
                d.chmod(0o555)
        code, _, err = invoke(folder, ["score", "-c", "cfg.yaml"], monkeypatch)
        lines = err.strip().splitlines()
        record("fault: read-only workdir", {"mounted": mounted, "exit": code, "line": lines[:1]})
        assert code == 2 and len(lines) == 1, err
        assert "runs/f/scores" in lines[0] and ("read-only file system" in lines[0].lower() or "permission" in lines[0])


def test_damaged_chunks_of_a_partial_folder_are_redone_with_a_warning(fault_world, tmp_path, monkeypatch):
    """A zero-byte chunk (a power loss before its data reached the disk), a truncated one and one with the
    wrong rows: each redone with one warning line, never a crash; the version equals the clean run."""
    for stage, verb, keys in (
        ("samples", "sample", ["llama-00002", "qwen-00005", "qwen-00007"]),
        ("scores", "score", ["chunk-000000", "chunk-000009", "chunk-000015"]),
    ):
        folder = fault_world.case(tmp_path / stage, stage)
        clean = fault_world.clean(stage)
        partial = folder / "runs" / NAME / stage / f".partial-{clean.fingerprint[:16]}"
        shutil.copytree(clean.data, partial / "data")
        empty, cut, wrong = (partial / "data" / f"{k}.parquet" for k in keys)
        empty.write_bytes(b"")
        cut.write_bytes(cut.read_bytes()[:100])
        table = pq.read_table(wrong)
        pq.write_table(table.slice(0, 1).replace_schema_metadata(table.schema.metadata), wrong)
        code, out, err = invoke(folder, [verb, "-c", "cfg.yaml"], monkeypatch)
        assert code == 0, out + err
        warnings = [line for line in out.splitlines() if line.startswith("WARNING: chunk ")]
        assert len(warnings) == 3, out
        assert any(f"{keys[0]}.parquet: unreadable" in w and w.endswith("; redoing it") for w in warnings)
        assert any(f"{keys[2]}.parquet: 1 rows, expected" in w for w in warnings), warnings
        version = RunStore(folder / "runs" / NAME).latest(stage)
        assert data_files(version.path) == data_files(clean.path)
        counts = tally(stage, clean.path, version.path)
        record(f"fault: damaged {stage} chunks", counts)
        assert (counts["lost"], counts["duplicated"], counts["differing"]) == (0, 0, 0)


def test_force_regenerates_and_clean_removes_abandoned_partials(fault_world, tmp_path, monkeypatch):
    folder = fault_world.case(tmp_path / "force", "samples")
    clean = fault_world.clean("samples")
    stage_dir = folder / "runs" / NAME / "samples"
    partial = stage_dir / f".partial-{clean.fingerprint[:16]}"
    shutil.copytree(clean.data, partial / "data")
    (partial / "data" / "llama-00000.parquet").unlink()
    kept = (partial / "data" / "llama-00001.parquet").stat().st_ino
    # status lists the partial folder as abandoned; --dry-run removes nothing
    code, out, _ = invoke(folder, ["status", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and partial.name in out and "partial, abandoned" in out and "15 chunk file(s)" in out
    code, out, _ = invoke(folder, ["clean", "-c", "cfg.yaml", "--dry-run"], monkeypatch)
    assert code == 0 and f"would remove: samples/{partial.name}" in out and partial.is_dir()
    # --force does not reuse a chunk of the earlier attempt: every chunk is written again
    code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 0, err
    assert f"--force: removed the earlier attempt {partial.name}" in out and "8 of 8 chunks to do" in out
    [version] = RunStore(folder / "runs" / NAME).versions("samples")
    assert (version.data / "llama-00001.parquet").stat().st_ino != kept
    assert data_files(version.path) == data_files(clean.path)
    # a forced redo of a complete version goes to a folder of its own; left abandoned, clean removes it, but
    # never a folder a live job works in
    redo = stage_dir / f".partial-{clean.fingerprint[:16]}-after-v001"
    shutil.copytree(clean.data, redo / "data")
    live = stage_dir / ".partial-0123456789abcdef"
    (live / "data").mkdir(parents=True)
    store = RunStore(folder / "runs" / NAME)
    with store.using(live):
        code, out, _ = invoke(folder, ["status", "-c", "cfg.yaml"], monkeypatch)
        assert "partial, running" in out and f"pid {os.getpid()} on " in out
        code, out, _ = invoke(folder, ["clean", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and f"removed: samples/{redo.name}" in out and not redo.exists()
    assert live.is_dir() and live.name not in out
    # --force does not remove a folder a live job fills
    shutil.copytree(clean.data, redo / "data")
    with store.using(redo):
        code, _, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 2 and f"--force: {redo.relative_to(folder)} is in use by pid {os.getpid()}" in err
    assert (redo / "data" / "llama-00000.parquet").is_file()
    assert [v.name for v in RunStore(folder / "runs" / NAME).versions("samples")] == ["v001"]


def test_versions_take_the_umask(fault_world, tmp_path, monkeypatch):
    """Shared clusters: a version is readable by the group (umask 027 here), model weights included (safetensors
    writes 0600 files) and the private temporary folder of a non-resumable stage too."""
    old = os.umask(0o027)
    try:
        for stage, verb in (("datasets", "build"), ("sft", "sft")):
            folder = fault_world.case(tmp_path / stage, stage)
            code, _, err = invoke(folder, [verb, "-c", "cfg.yaml"], monkeypatch)
            assert code == 0, err
            version = RunStore(folder / "runs" / NAME).latest(stage)
            modes = {p.relative_to(version.path).as_posix(): p.stat().st_mode & 0o777 for p in version.path.rglob("*")}
            modes["."] = version.path.stat().st_mode & 0o777
            assert {m for p, m in modes.items() if (version.path / p).is_dir()} == {0o750}, modes
            assert {m for p, m in modes.items() if (version.path / p).is_file()} == {0o640}, modes
    finally:
        os.umask(old)
