"""Shared fixtures: real tiny models and tokenizers built locally once per session (seconds, no hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models are overhead-bound: one OpenMP thread per process avoids spinning threads fighting for 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(config, items):
    """Hardware markers (pyproject.toml): `gpu` tests skip without a CUDA GPU, `cpu_only` tests skip with one."""
    marked = [i for i in items if i.get_closest_marker("gpu") or i.get_closest_marker("cpu_only")]
    if not marked:
        return
    import torch

    gpu = torch.cuda.is_available()
    for item in marked:
        if item.get_closest_marker("gpu") and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("cpu_only") and gpu:
            item.add_marker(pytest.mark.skip(reason="asserts CPU-only behaviour; a CUDA GPU is visible"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests in this process: one torch thread (OMP_NUM_THREADS may have been read before it was set)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _make(tiny_dir: Path, name: str, **kw) -> Path:
    from fusechat.demo.tiny import TinySpec, make_tiny

    reward = kw.pop("reward", False)
    corpus = kw.pop("corpus", None)
    out = tiny_dir / name
    if not (out / "config.json").exists():
        make_tiny(out, TinySpec(**kw), reward=reward, corpus=corpus)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    """Llama architecture, char tokenizer, Llama-3-style template (template emits BOS; encode adds one too)."""
    return _make(tiny_dir, "llama", arch="llama", chat="llama3", tokenizer="char", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_dir) -> Path:
    """Qwen2 architecture, char tokenizer, ChatML template (AutoTokenizer would swap in Qwen2Tokenizer)."""
    return _make(tiny_dir, "qwen2", arch="qwen2", chat="chatml", tokenizer="char", seed=2)


@pytest.fixture(scope="session")
def tiny_mistral_bpe(tiny_dir) -> Path:
    """Mistral architecture, byte-level BPE tokenizer, [INST] template."""
    corpus = [f"what is {a}+{b}? the answer is {a + b}. reverse: abc -> cba" for a in range(40) for b in range(10)]
    return _make(tiny_dir, "mistral", arch="mistral", chat="mistral", tokenizer="bpe", corpus=corpus, seed=3)


@pytest.fixture(scope="session")
def tiny_reward(tiny_dir) -> Path:
    """A one-output sequence-classification reward model (Llama, ChatML template)."""
    return _make(tiny_dir, "reward", arch="llama", chat="chatml", tokenizer="char", reward=True, seed=4)


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the current directory set to a fresh temporary folder (configs use relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `fusechat demo --small` (a few minutes) per session, shared by the end-to-end and report tests: the
    folder it ran in (its `runs/`) and the finished process."""
    cwd = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "demo", "--small"],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return cwd, done


@pytest.fixture(scope="session")
def fault_world(tmp_path_factory, tiny_llama, tiny_qwen2, tiny_reward):
    """The small pipeline run once cleanly (tests/fault_world.py): the reference of the fault suite."""
    from fault_world import build_world

    models = {"llama": tiny_llama, "qwen2": tiny_qwen2, "reward": tiny_reward}
    return build_world(tmp_path_factory.mktemp("fault_world"), models)
