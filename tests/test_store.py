import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusechat.errors import UserError
from fusechat.store import RunStore, StageResult, fingerprint, run_stage


def body_writing(text: str):
    def body(out: Path) -> StageResult:
        (out / "data").mkdir()
        (out / "data" / "x.txt").write_text(text)
        return StageResult(counts={"rows": 1})

    return body


def test_commit_writes_manifest_and_numbered_version(tmp_path):
    store = RunStore(tmp_path)
    v = run_stage(store, "prompts", {"a": 1}, {}, body_writing("hi"), log=lambda s: None)
    assert v.name == "v001"
    manifest = json.loads((tmp_path / "prompts/v001/manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["version"] == "v001"
    assert manifest["stage"] == "prompts"
    assert manifest["config"] == {"a": 1}
    assert manifest["counts"] == {"rows": 1}
    assert set(manifest) >= {"created_at", "fingerprint", "inputs", "timings", "fusechat_version"}
    assert (v.data / "x.txt").read_text() == "hi"
    assert store.partials("prompts") == []


def test_cache_hit_does_no_work(tmp_path):
    store = RunStore(tmp_path)
    logs = []
    v1 = run_stage(store, "prompts", {"a": 1}, {}, body_writing("hi"), log=logs.append)

    def exploding(out):
        raise AssertionError("must not run")

    v2 = run_stage(store, "prompts", {"a": 1}, {}, exploding, log=logs.append)
    assert v2.name == v1.name
    assert logs[-1] == "cached: prompts/v001"
    v3 = run_stage(store, "prompts", {"a": 2}, {}, body_writing("x"), log=logs.append)
    assert v3.name == "v002"
    v4 = run_stage(store, "prompts", {"a": 2}, {}, body_writing("y"), force=True, log=logs.append)
    assert v4.name == "v003"


def test_fingerprint_depends_on_inputs(tmp_path):
    store = RunStore(tmp_path)
    p1 = run_stage(store, "prompts", {"a": 1}, {}, body_writing("1"), log=lambda s: None)
    p2 = run_stage(store, "prompts", {"a": 2}, {}, body_writing("2"), log=lambda s: None)
    assert fingerprint("samples", {}, {"prompts": p1}) != fingerprint("samples", {}, {"prompts": p2})
    s1 = run_stage(store, "samples", {}, {"prompts": p1}, body_writing("s"), log=lambda s: None)
    assert s1.manifest["inputs"] == {"prompts": "v001"}


def test_failed_body_leaves_nothing(tmp_path):
    store = RunStore(tmp_path)

    def failing(out):
        (out / "half").write_text("x")
        raise UserError("bad row")

    with pytest.raises(UserError):
        run_stage(store, "prompts", {}, {}, failing, log=lambda s: None)
    assert store.versions("prompts") == []
    assert store.partials("prompts") == []


def test_resolve_latest_and_pinned(tmp_path):
    store = RunStore(tmp_path)
    run_stage(store, "prompts", {"a": 1}, {}, body_writing("1"), log=lambda s: None)
    run_stage(store, "prompts", {"a": 2}, {}, body_writing("2"), log=lambda s: None)
    assert store.resolve("prompts").name == "v002"
    assert store.resolve("prompts", "v001").name == "v001"
    assert store.resolve("prompts", "1").name == "v001"
    with pytest.raises(UserError, match="--input prompts=v009: .*v009 does not exist"):
        store.resolve("prompts", "v009")
    with pytest.raises(UserError, match="no complete samples version"):
        store.resolve("samples")


def test_a_version_dir_with_a_broken_manifest_is_an_error_naming_it(tmp_path):
    """Never read, never silently skipped (that would let an older version stand in or redo the work)."""
    store = RunStore(tmp_path)
    run_stage(store, "prompts", {"a": 1}, {}, body_writing("1"), log=lambda s: None)
    for name, text in (("v002", None), ("v003", '{"status": "running", "fingerprint": "x"}'), ("v004", "{trunc")):
        (tmp_path / "prompts" / name).mkdir()
        if text is not None:
            (tmp_path / "prompts" / name / "manifest.json").write_text(text)
        with pytest.raises(UserError, match=rf"^{tmp_path}/prompts/{name}/manifest.json: "):
            store.resolve("prompts")
        with pytest.raises(UserError, match=rf"prompts/{name}/manifest.json: "):
            run_stage(store, "prompts", {"a": 1}, {}, body_writing("1"), log=lambda s: None)
        versions, broken = store.scan("prompts")
        assert [v.name for v in versions] == ["v001"] and broken[0][0].parent.name == name
        shutil.rmtree(tmp_path / "prompts" / name)
    assert store.resolve("prompts").name == "v001"


def test_files_are_checked_against_the_manifest(tmp_path):
    store = RunStore(tmp_path)

    def body(out: Path) -> StageResult:
        (out / "data").mkdir()
        for i in range(2):
            pq.write_table(pa.table({"x": list(range(3 + i))}), out / "data" / f"c{i}.parquet")
        return StageResult()

    v = run_stage(store, "samples", {}, {}, body, resumable=True, log=lambda s: None)
    assert v.manifest["files"]["data/c1.parquet"]["rows"] == 4 and v.manifest["files"]["data/c0.parquet"]["bytes"] > 0
    assert store.resolve("samples").name == "v001"
    c0 = v.data / "c0.parquet"
    blob = c0.read_bytes()
    c0.write_bytes(blob[:-10])  # truncated
    with pytest.raises(UserError, match=r"c0.parquet: \d+ bytes, the manifest says \d+ .*samples/v001 is damaged"):
        store.resolve("samples")
    c0.unlink()  # lost
    with pytest.raises(UserError, match=r"c0.parquet: missing \(samples/v001 is damaged"):
        store.resolve("samples", "v001")
    logs = []
    with pytest.raises(UserError, match="c0.parquet: missing"):  # a damaged cache hit is not used either
        run_stage(store, "samples", {}, {}, body, resumable=True, log=logs.append)
    c0.write_bytes(blob)
    pq.write_table(pa.table({"x": [1]}), v.data / "stray.parquet")
    with pytest.raises(UserError, match=r"stray.parquet: not part of samples/v001"):
        store.resolve("samples")


def test_resumable_partial_is_shared_and_kept_on_failure(tmp_path):
    store = RunStore(tmp_path)

    def partial_then_fail(out):
        (out / "chunk-0").write_text("done")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(store, "samples", {"k": 1}, {}, partial_then_fail, resumable=True, log=lambda s: None)
    [partial] = store.partials("samples")

    def finish(out):
        assert out == partial
        assert (out / "chunk-0").read_text() == "done"
        return StageResult(counts={"chunks": 1})

    v = run_stage(store, "samples", {"k": 1}, {}, finish, resumable=True, log=lambda s: None)
    assert (v.path / "chunk-0").exists()
    assert store.partials("samples") == []


def _create(root: str, i: int, q) -> None:
    store = RunStore(root)
    v = run_stage(store, "prompts", {"i": i}, {}, body_writing(str(i)), log=lambda s: None)
    q.put(v.name)


def test_concurrent_creation_never_collides(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(tmp_path), i, q)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    names = sorted(q.get() for _ in procs)
    assert names == [f"v{i:03d}" for i in range(1, 7)]
    store = RunStore(tmp_path)
    texts = sorted((v.data / "x.txt").read_text() for v in store.versions("prompts"))
    assert texts == [str(i) for i in range(6)]


def test_status_shows_broken_versions_and_partials_by_state(tmp_path):
    from rich.console import Console

    from fusechat.status import clean, status_table

    store = RunStore(tmp_path / "runs" / "r[1]")  # brackets in a path are shown as they are
    run_stage(store, "prompts", {"a": 1}, {}, body_writing("1"), log=lambda s: None)
    (store.stage_dir("prompts") / "v002").mkdir()
    live = store.partial_dir("samples", "f" * 64)
    dead = store.partial_dir("scores", "e" * 64)
    console = Console(width=250, record=True)
    with store.using(live):
        console.print(status_table(store))
        assert clean(store) == [("scores", dead, 0)]
    text = console.export_text()
    assert f"fusechat run: {store.root}" in text
    assert "broken" in text and "manifest.json: missing" in text
    assert "partial, running" in text and "partial, abandoned" in text
    assert live.is_dir() and not dead.exists()
