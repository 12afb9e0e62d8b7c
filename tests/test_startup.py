"""Start-up: ``prefopt --version`` and ``--help`` import no torch; the public names still import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m prefopt ARGS``; the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "prefopt", *args], capture_output=True, text=True, env=env, timeout=60)
    lines = [line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return proc, {name.split(".")[0] for name in lines}


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"]])
def test_version_and_help_import_no_torch(args):
    proc, modules = _imported(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prefopt" in modules  # the import log was read
    assert not modules & {"torch", "transformers", "accelerate", "pydantic"}, sorted(modules)
    import prefopt

    assert (f"prefopt {prefopt.__version__}" in proc.stdout) == (args == ["--version"])


def test_public_names_import_lazily_and_stay_the_same_objects():
    import prefopt
    from prefopt import Loss as Loss2
    from prefopt import LossInputs, build_loss, hookimpl
    from prefopt.losses.base import Loss
    from prefopt.plugins.hookspecs import hookimpl as spec_hookimpl
    from prefopt.plugins.registry import build_loss as registry_build_loss

    assert Loss2 is Loss and hookimpl is spec_hookimpl and build_loss is registry_build_loss
    assert LossInputs.__module__ == "prefopt.losses.base"
    assert set(prefopt.__all__) <= set(dir(prefopt))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        prefopt.nothing  # noqa: B018
