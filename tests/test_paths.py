"""Relative paths in a run config: one rule, and the start-up line that shows the result."""
from __future__ import annotations

import os

import pytest

from prefopt.config import describe_paths, load_config
from prefopt.errors import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    """configs/run.yaml beside configs/data.jsonl; the working directory is elsewhere."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "data.jsonl").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = tmp_path / "configs" / "run.yaml"
    path.write_text("model: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}\ndata: {train: data.jsonl}\ntrainer: {output_dir: runs/a}\n")
    return path


def test_file_paths_and_defaults_are_beside_the_config(project):
    config = load_config(project)
    configs = project.parent
    assert config.data.train == str(configs / "data.jsonl")
    assert config.trainer.output_dir == str(configs / "runs" / "a")
    assert config.reference.cache_dir == str(configs / ".prefopt-cache")
    assert config.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"  # a Hub name, unchanged
    line = describe_paths(config)
    assert f"data.train = {configs / 'data.jsonl'}" in line and "Qwen/Qwen2.5-0.5B-Instruct (Hub)" in line
    assert f"trainer.output_dir = {configs / 'runs' / 'a'}" in line


def test_set_paths_are_from_the_working_directory(project):
    (project.parent.parent / "elsewhere" / "other.jsonl").write_text("")
    config = load_config(project, ["data.train=other.jsonl", "trainer.output_dir=runs/b"])
    assert (config.data.train, config.trainer.output_dir) == (os.path.abspath("other.jsonl"), os.path.abspath("runs/b"))
    assert f"trainer.output_dir = {os.path.abspath('runs/b')}" in describe_paths(config)


def test_a_path_only_in_the_working_directory_is_a_clear_error(project):
    (project.parent.parent / "elsewhere" / "cwd.jsonl").write_text("")
    project.write_text(project.read_text().replace("data.jsonl", "cwd.jsonl"))
    with pytest.raises(ConfigError, match=r"data.train: 'cwd.jsonl' is not beside the config .* write '../elsewhere/cwd.jsonl'"):
        load_config(project)


def test_a_missing_local_looking_path_names_where_it_was_looked_for(project):
    project.write_text(project.read_text().replace("data.jsonl", "missing.jsonl"))
    assert load_config(project).data.train == str(project.parent / "missing.jsonl")
