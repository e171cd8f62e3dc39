"""`make lint`'s import contracts hold, and they fail on a planted cycle, an upward import or an Airflow import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(include: Path) -> subprocess.CompletedProcess[str]:
    # the copy on PYTHONPATH comes before the installed (editable) package
    return subprocess.run([str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=include,
                          env={"PYTHONPATH": str(include), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


@pytest.fixture
def library_copy(tmp_path):
    shutil.copytree(ROOT / "include" / "atlasflow", tmp_path / "atlasflow",
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    return tmp_path


def test_the_library_keeps_its_contracts(library_copy):
    done = _lint(library_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "planted", "broken"), [
    ("core/config.py", "import atlasflow.steps.ingest", "lower never imports higher"),
    ("steps/retrain.py", "import atlasflow.steps.ingest", "no import cycles"),
    ("model/tokenizer.py", "import airflow", "never imports Airflow"),
])
def test_a_planted_violation_breaks_lint(library_copy, module, planted, broken):
    path = library_copy / "atlasflow" / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    done = _lint(library_copy)
    assert done.returncode != 0
    assert broken in done.stdout and "BROKEN" in done.stdout, done.stdout
