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
    config = mutate(w.config, "prompts.sources", [])
    return mutate(config, "sources", config["sources"][:2])  # the dataset source names a prompt source


def all_k_zero(f, w):
    config = mutate(w.config, "sources.0.samples", {"chat": 0, "math": 0})
    config = mutate(config, "sources.1.samples", {"chat": 0, "math": 0})
    return mutate(config, "sources", config["sources"][:2])  # a dataset source answering nothing is a config error


def answers_not_kept(f, w):
    """A prompts version made before the math source mapped its answers (no responses.parquet)."""
    version = f / "runs" / NAME / "prompts" / "v001"
    (version / "responses.parquet").unlink()
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["files"]["responses.parquet"]
    (version / "manifest.json").write_text(json.dumps(manifest))


def break_manifest(stage: str, text: str):
    def setup(f, w):
        (f / "runs" / NAME / stage / "v001" / "manifest.json").write_text(text)

    return setup


def damage(stage: str, rel: str, how: str):
    """Damage a file of the copied version (`rel` may be a glob: the first match, e.g. a score chunk named after
    its samples part's fingerprint)."""

    def setup(f, w):
        version = f / "runs" / NAME / stage / "v001"
        target = sorted(version.glob(rel))[0] if "*" in rel else version / rel
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
    # ingestion as the paper did, existing answers as a source, the length filter (issue 11's keys)
    (
        "stratify without a limit",
        [],
        None,
        ["prompts", "--set", "prompts.sources.0.stratify=kind"],
        "prompts.sources[0].stratify: splits a `limit` by this column: set limit, and a column name",
    ),
    (
        "stratify by a column the rows lack",
        [],
        None,
        ["prompts", "--set", "prompts.sources.0.limit=4", "--set", "prompts.sources.0.stratify=origin"],
        "prompts.jsonl:1: missing field 'origin' (mapped by prompts.sources[0].stratify)",
    ),
    (
        "exclude_topics not a topic",
        [],
        None,
        ["prompts", "--set", "prompts.sources.0.exclude_topics=[poetry]"],
        "prompts.sources[0].exclude_topics[0]: Input should be 'code' or 'math'",
    ),
    (
        "max_responses of 0",
        [],
        None,
        ["prompts", "--set", "prompts.sources.1.max_responses=0"],
        "prompts.sources[1].max_responses: Input should be greater than or equal to 1",
    ),
    (
        "max_responses without fields.response",
        [],
        None,
        ["prompts", "--set", "prompts.sources.0.max_responses=3"],
        "prompts.sources[0].max_responses: counts the answers of fields.response, which is not set",
    ),
    (
        "turn_markers with an empty marker",
        [],
        None,
        ["prompts", "--set", "prompts.sources.0.fields.turn_markers={user: ''}"],
        "prompts.sources[0].fields: turn_markers split a prompt text column",
    ),
    (
        "dataset source with a model",
        [],
        None,
        ["sample", "--set", "sources.2.model=/models/x"],
        "sources[2]: engine: dataset takes `dataset` (a prompt source with fields.response), no model",
    ),
    (
        "dataset source naming a prompt source without answers",
        [],
        None,
        ["sample", "--set", "sources.2.dataset=chat"],
        "sources[2].dataset: 'chat' is not a prompt source with fields.response (math)",
    ),
    (
        "dataset source with sampling settings",
        [],
        None,
        ["sample", "--set", "sources.2.sampling.temperature=0.5"],
        "sources[2].sampling: engine: dataset loads no model, so this setting does nothing; remove it",
    ),
    (
        "dataset source taking no answer",
        [],
        None,
        ["sample", "--set", "sources.2.samples.math=0"],
        "sources[2].samples: 0 for domain 'math', the domain of prompt source 'math': answers would take none",
    ),
    (
        "model engine without a model",
        [],
        None,
        ["sample", "--set", "sources.2.engine=vllm"],
        "sources[2]: engine: vllm takes `model` (a local directory or hub id), no dataset",
    ),
    (
        "over_length not a rule",
        [],
        None,
        ["build", "--set", "build.over_length=cut"],
        "build.over_length: Input should be 'exclude' or 'truncate'",
    ),
    (
        "over_length truncate without max_length",
        [],
        None,
        ["build", "--set", "build.max_length=null", "--set", "build.over_length=truncate"],
        "build.over_length: truncate cuts to build.max_length, which is null",
    ),
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
        "--source nope: not in the config's sources (llama, qwen, answers)",
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
        "dataset source without answers in the prompts version",
        ["prompts"],
        answers_not_kept,
        ["sample"],
        "sources[2].dataset (answers): prompts/v001 holds no answers of prompt source 'math'",
    ),
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
        "answers missing from the input",
        ["prompts"],
        damage("prompts", "responses.parquet", "delete"),
        ["sample"],
        "prompts/v001/responses.parquet: missing (prompts/v001 is damaged; `fusechat prompts --force` makes it again)",
    ),
    (
        "answers truncated in the input",
        ["prompts"],
        damage("prompts", "responses.parquet", "truncate"),
        ["sample"],
        "prompts/v001/responses.parquet: ",
    ),
    (
        "dataset source's chunk missing from the input",
        ["prompts", "samples"],
        damage("samples", "data/answers-00001.parquet", "delete"),
        ["score"],
        "samples/v001/data/answers-00001.parquet: missing (samples/v001 is damaged",
    ),
    (
        "chunk with rows lost",
        ["prompts", "samples", "scores"],
        damage("scores", "data/*-llama-00002-0000.parquet", "rows"),
        ["build"],
        "-llama-00002-0000.parquet: ",
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
    """`sample` on a full disk: one line, exit 2, the finished chunks of the parts kept; with space again the same
    command completes the version, equal to the clean run."""
    with small_disk(tmp_path / "disk", "1m") as mounted:
        folder = fault_world.case(tmp_path / "disk" / "case", "samples")
        if mounted:
            filler = folder / "filler"
            free = shutil.disk_usage(folder).free
            filler.write_bytes(b"\0" * max(free - 24 * 1024, 0))  # room for a few chunks, not all 18
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
        assert lines[0].startswith("error: ") and "/samples/parts/" in lines[0], lines[0]
        assert "/data/" in lines[0] and ".parquet: no space left on the device" in lines[0], lines[0]
        stage_dir = folder / "runs" / NAME / "samples"
        kept = len(list(stage_dir.glob("parts/*/data/*.parquet")))
        assert 0 < kept < 18 and not list(stage_dir.glob("parts/*/data/.*")), kept  # finished chunks kept, no temp
        partial = next(stage_dir.glob(".partial-*"))
        assert visible(folder / "runs" / NAME)["samples"] == [partial.name, "parts"]
        if mounted:
            (folder / "filler").unlink()
        else:
            monkeypatch.undo()
        code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml"], monkeypatch)
        assert code == 0, err
        assert "chunks to do" in out
        version = RunStore(folder / "runs" / NAME).latest("samples")
        assert data_files(version.path) == data_files(fault_world.clean("samples").path)
        assert data_files(stage_dir / "parts") == data_files(fault_world.run_dir / "samples" / "parts")


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


def test_damaged_chunks_are_redone_with_a_warning(fault_world, tmp_path, monkeypatch):
    """A zero-byte chunk (a power loss before its data reached the disk), a truncated one and one with the wrong
    rows, in the samples parts (each looks complete, so would pass as cached but for this check; the version's
    folder holds links to the damaged files) and in a scores partial folder: each redone with one warning line, never a
    crash; the version equals the clean run."""
    for stage, verb in (("samples", "sample"), ("scores", "score")):
        clean = fault_world.clean(stage)
        if stage == "samples":
            folder = fault_world.case(tmp_path / stage, stage, parts=("llama", "qwen", "answers"))
            parts = folder / "runs" / NAME / "samples" / "parts"
            damaged = [
                next(parts.glob(f"*/data/{key}.parquet")) for key in ("llama-00002", "qwen-00005", "answers-00001")
            ]
        else:
            folder = fault_world.case(tmp_path / stage, stage)
            partial = folder / "runs" / NAME / stage / f".partial-{clean.fingerprint[:16]}"
            shutil.copytree(clean.data, partial / "data")
            damaged = [sorted((partial / "data").glob("*.parquet"))[i] for i in (0, 9, 15)]
        empty, cut, wrong = damaged
        empty.write_bytes(b"")
        cut.write_bytes(cut.read_bytes()[:100])
        table = pq.read_table(wrong)
        pq.write_table(table.slice(0, 1).replace_schema_metadata(table.schema.metadata), wrong)
        if stage == "samples":  # a run killed while linking its version left links to the damaged files there
            partial = folder / "runs" / NAME / stage / f".partial-{clean.fingerprint[:16]}"
            (partial / "data").mkdir(parents=True)
            for f in damaged:
                os.link(f, partial / "data" / f.name)
        code, out, err = invoke(folder, [verb, "-c", "cfg.yaml"], monkeypatch)
        assert code == 0, out + err
        warnings = [line for line in out.splitlines() if line.startswith("WARNING: chunk ")]
        assert len(warnings) == 3, out
        assert any(f"{empty.name}: unreadable" in w and w.endswith("; redoing it") for w in warnings), warnings
        assert any(f"{wrong.name}: 1 rows, expected" in w for w in warnings), warnings
        version = RunStore(folder / "runs" / NAME).latest(stage)
        assert data_files(version.path) == data_files(clean.path)
        counts = tally(stage, clean.path, version.path)
        record(f"fault: damaged {stage} chunks", counts)
        assert (counts["lost"], counts["duplicated"], counts["differing"]) == (0, 0, 0)
        if stage == "samples":  # only the damaged chunks were sampled again; the parts equal the clean ones
            assert "llama: loading" in out and "1 of 8 chunks to do" in out and "answers: cached" not in out
            assert data_files(parts) == data_files(fault_world.run_dir / "samples" / "parts")


def test_a_damaged_score_chunk_is_not_reused(fault_world, tmp_path, monkeypatch):
    """A scores version lends its chunks by hard link to the next one scored the same way; a lent chunk that no
    longer matches its version's manifest is scored again instead (and the new version equals a clean scoring)."""
    config = mutate(fault_world.config, "sources.1.sampling.temperature", 0.5)  # a new qwen part; llama, answers reused
    folder = fault_world.case(tmp_path / "reuse", None, config)
    for stage in ("scores", "datasets", "sft", "dpo"):
        shutil.rmtree(folder / "runs" / NAME / stage)
    shutil.copytree(fault_world.run_dir / "scores", folder / "runs" / NAME / "scores")
    donor = folder / "runs" / NAME / "scores" / "v001" / "data"
    cut = sorted(donor.glob("*-llama-00003-0000.parquet"))[0]
    cut.write_bytes(cut.read_bytes()[:-64])
    code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and "llama: cached" in out and "qwen: loading" in out, out + err
    code, out, err = invoke(folder, ["score", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0, out + err
    assert "scores: 9 of 22 chunks cached from scores/v001" in out  # llama's 8 and answers' 2, less the cut one
    store = RunStore(folder / "runs" / NAME)
    version = store.latest("scores")
    assert version.name == "v002" and (version.data / cut.name).stat().st_ino != cut.stat().st_ino
    clean = fault_world.clean("scores")
    kept = {name: data for name, data in data_files(version.path).items() if "-qwen-" not in name}
    assert kept == {name: data for name, data in data_files(clean.path).items() if "-qwen-" not in name}
    assert len(kept) == 10


def test_a_part_damaged_in_place_is_caught_in_the_version_linking_it(fault_world, tmp_path, monkeypatch):
    """A samples version's files are hard links to its parts' chunks: a chunk changed in place after the commit
    changes the version too, and its manifest check names it (for `sample` itself and every stage reading it);
    `sample --force` makes the version again from scratch."""
    folder = fault_world.case(tmp_path / "linked", "samples", parts=("llama", "qwen", "answers"))
    code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and "qwen: cached" in out, out + err
    [chunk] = (folder / "runs" / NAME / "samples").glob("parts/qwen-*/data/qwen-00003.parquet")
    linked = folder / "runs" / NAME / "samples" / "v001" / "data" / "qwen-00003.parquet"
    assert linked.stat().st_ino == chunk.stat().st_ino
    with open(chunk, "r+b") as fh:
        fh.truncate(chunk.stat().st_size - 64)
    for verb in ("score", "sample"):
        code, _, err = invoke(folder, [verb, "-c", "cfg.yaml"], monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert (
            f"{linked.relative_to(folder)}: " in lines[0]
            and "(samples/v001 is damaged; `fusechat sample --force`" in lines[0]
        )
    code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 0, out + err
    version = RunStore(folder / "runs" / NAME).latest("samples")
    assert version.name == "v002" and data_files(version.path) == data_files(fault_world.clean("samples").path)


def test_force_regenerates_and_clean_removes_abandoned_partials(fault_world, tmp_path, monkeypatch):
    folder = fault_world.case(tmp_path / "force", "samples", parts=("llama", "qwen", "answers"))
    clean = fault_world.clean("samples")
    stage_dir = folder / "runs" / NAME / "samples"
    [llama] = stage_dir.glob("parts/llama-*")
    (llama / "data" / "llama-00000.parquet").unlink()
    kept = (llama / "data" / "llama-00001.parquet").stat().st_ino
    partial = stage_dir / f".partial-{clean.fingerprint[:16]}"
    (partial / "data").mkdir(parents=True)
    # status lists the half-filled part and the partial folder as abandoned; --dry-run removes nothing
    code, out, _ = invoke(folder, ["status", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and partial.name in out and "partial, abandoned" in out
    assert f"parts/{llama.name}" in out and "part, abandoned" in out and "chunks=7/8" in out
    code, out, _ = invoke(folder, ["clean", "-c", "cfg.yaml", "--dry-run"], monkeypatch)
    assert code == 0 and f"would remove: samples/parts/{llama.name}" in out and llama.is_dir()
    assert "qwen-" not in out  # a complete part is never cleaned
    # --force does not reuse a chunk of the earlier attempt, nor a complete part: every chunk is written again
    code, out, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 0, err
    assert f"--force: removed samples/parts/{llama.name}" in out and "8 of 8 chunks to do" in out
    assert "qwen: cached" not in out and "answers: cached" not in out
    [version] = RunStore(folder / "runs" / NAME).versions("samples")
    assert (version.data / "llama-00001.parquet").stat().st_ino != kept
    assert data_files(version.path) == data_files(clean.path)
    # a forced redo of a complete version goes to a folder of its own; left abandoned, clean removes it, and a
    # half-filled part, but never a folder or a part a live job works in
    redo = stage_dir / f".partial-{clean.fingerprint[:16]}-after-v001"
    (redo / "data").mkdir(parents=True)
    live = stage_dir / ".partial-0123456789abcdef"
    (live / "data").mkdir(parents=True)
    [qwen] = stage_dir.glob("parts/qwen-*")
    (qwen / "data" / "qwen-00003.parquet").unlink()
    live_part = stage_dir / "parts" / "other-0123456789abcdef"
    (live_part / "data").mkdir(parents=True)
    store = RunStore(folder / "runs" / NAME)
    with store.using(live), store.using(live_part):
        code, out, _ = invoke(folder, ["status", "-c", "cfg.yaml"], monkeypatch)
        assert "partial, running" in out and "part, running" in out and f"pid {os.getpid()} on " in out
        code, out, _ = invoke(folder, ["clean", "-c", "cfg.yaml"], monkeypatch)
    assert code == 0 and f"removed: samples/{redo.name}" in out and not redo.exists()
    assert f"removed: samples/parts/{qwen.name}" in out and not qwen.exists()
    assert live.is_dir() and live.name not in out and live_part.is_dir() and live_part.name not in out
    assert version.path.is_dir() and data_files(version.path) == data_files(clean.path)  # links outlive the part
    # --force does not remove a part a live job fills
    with store.using(llama):
        code, _, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 2 and f"--force: samples/parts/{llama.name} is in use by pid {os.getpid()}" in err
    assert (llama / "data" / "llama-00000.parquet").is_file()
    # --force does not remove a folder a live job fills
    (redo / "data").mkdir(parents=True)
    (redo / "progress.json").write_text("{}")
    with store.using(redo):
        code, _, err = invoke(folder, ["sample", "-c", "cfg.yaml", "--force"], monkeypatch)
    assert code == 2 and f"--force: {redo.relative_to(folder)} is in use by pid {os.getpid()}" in err
    assert (llama / "data" / "llama-00000.parquet").is_file()  # refused before any part was started over
    assert [v.name for v in RunStore(folder / "runs" / NAME).versions("samples")] == ["v001"]


def test_versions_take_the_umask(fault_world, tmp_path, monkeypatch):
    """Shared clusters: a version is readable by the group (umask 027 here), model weights included (safetensors
    writes 0600 files), the private temporary folder of a non-resumable stage too, and a samples version's links
    to its parts."""
    old = os.umask(0o027)
    try:
        for stage, verb in (("samples", "sample"), ("datasets", "build"), ("sft", "sft")):
            # samples: every part already there (made under another umask), so the version only links them
            parts = ("llama", "qwen", "answers") if stage == "samples" else ()
            folder = fault_world.case(tmp_path / stage, stage, parts=parts)
            code, _, err = invoke(folder, [verb, "-c", "cfg.yaml"], monkeypatch)
            assert code == 0, err
            version = RunStore(folder / "runs" / NAME).latest(stage)
            modes = {p.relative_to(version.path).as_posix(): p.stat().st_mode & 0o777 for p in version.path.rglob("*")}
            modes["."] = version.path.stat().st_mode & 0o777
            assert {m for p, m in modes.items() if (version.path / p).is_dir()} == {0o750}, modes
            assert {m for p, m in modes.items() if (version.path / p).is_file()} == {0o640}, modes
    finally:
        os.umask(old)
