"""Shared fixtures: a tiny tokenizer trained locally (no downloads), built-in losses only, one torch thread."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt.plugins import manager as plugins
from prefopt.testing.tiny import build_tokenizer

CORPUS = [
    "The cafe was lovely and the coffee was great.",
    "The phone was slow and the screen was awful.",
    "Tell me about the new phone. It is fast, bright and friendly to use.",
    "Review of the hotel: the room was clean, the staff were kind.",
    "What did you think of the movie? It was boring and far too long.",
    "Hello world! Numbers 0123456789, punctuation .,;:!?'\"()[]{}<>-_/\\ and unicode: café, naïve, 日本.",
]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer: BOS=0, EOS=1, PAD=2, with a simple chat template."""
    return build_tokenizer(CORPUS * 4, vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """The session tokenizer saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def builtins_only(monkeypatch):
    """Only the built-in losses, whatever plugin packages the environment has."""
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def group_plugins(tmp_path_factory):
    """plackett_luce and kto installed (offline, no dependencies) for a module's tests."""
    root = tmp_path_factory.mktemp("group-plugins")
    sources = []
    for name in ("plackett-luce", "kto"):
        shutil.copytree(Path(__file__).resolve().parents[1] / "plugins" / name, root / "src" / name, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        sources.append(str(root / "src" / name))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(root / "site"), *sources]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    mp = pytest.MonkeyPatch()
    mp.delenv("PREFOPT_LOAD_PLUGINS", raising=False)
    mp.syspath_prepend(str(root / "site"))
    importlib.invalidate_caches()
    plugins.reset()
    yield root / "site"
    mp.undo()
    for module in ("prefopt_plackett_luce", "prefopt_kto"):
        sys.modules.pop(module, None)
    plugins.reset()
