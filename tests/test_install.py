"""Installing where a user has Python, and running the local servers from wherever the checkout is.

The pinned set must install on every supported CPython (3.11.0-3.13.x), the bootstrap must refuse any
other interpreter before it installs anything, and the local servers' state must stay where their
daemon accounts (postgres, redis, munge) can reach it when the checkout is private to root.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# The oldest and newest patch release of each supported minor version that pins may have to admit.
SUPPORTED = [Version(v) for v in ("3.11.0", "3.11.2", "3.11.4", "3.11.5", "3.11.14", "3.12.0", "3.12.12", "3.13.0",
                                  "3.13.9")]


def _pins() -> list[tuple[str, str, str]]:
    """(name, version, marker) for every exact pin of requirements.txt."""
    out = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        spec, _, marker = line.partition(";")
        name, version = spec.split("==", 1)
        out.append((name.strip(), version.strip(), marker.strip()))
    return out


def _applies(marker: str, python: Version) -> bool:
    if not marker:
        return True
    v = str(python)
    return Marker(marker).evaluate({"python_full_version": v, "python_version": ".".join(v.split(".")[:2])})


def test_every_supported_python_gets_exactly_one_pin_per_package():
    pins = _pins()
    for python in SUPPORTED:
        names = [n.lower() for n, _, m in pins if _applies(m, python)]
        assert len(names) == len(set(names)), f"{python}: a package pinned twice"
        assert len(names) == len({n.lower() for n, _, _ in pins}), f"{python}: a package left unpinned"


def test_installed_pins_admit_every_python_they_are_pinned_for():
    """Requires-Python of each pin (read from the installed distribution) against every supported Python
    its line applies to: soupsieve 4.1.3 (>= 3.11.5) unconditionally pinned failed on Debian's 3.11.2."""
    here = Version(".".join(map(str, sys.version_info[:3])))
    refused = []
    for name, version, marker in _pins():
        if not _applies(marker, here):
            continue  # the pin for another Python is not installed here
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version.split("+", 1)[0] != version:
            continue  # another version installed (a helper's venv); the CI venv holds the pins
        requires = SpecifierSet(dist.metadata.get("Requires-Python") or "")
        refused += [f"{name}=={version} (Requires-Python {requires}) on {py}" for py in SUPPORTED
                    if _applies(marker, py) and not requires.contains(py, prereleases=True)]
    assert not refused, "pins that do not install on a supported Python (add a marker line): " + "; ".join(refused)


def _fake_python(tmp_path: Path, version: str) -> Path:
    """An interpreter that answers like CPython ``version`` (the real one, with the version patched)."""
    fake = tmp_path / f"python{version}"
    major, minor, micro = (int(x) for x in version.split("."))
    fake.write_text(
        f"#!{sys.executable}\n"
        "import platform, sys\n"
        f"platform.python_version = lambda: {version!r}\n"
        f"sys.version_info = ({major}, {minor}, {micro}, 'final', 0)\n"
        "exec(sys.argv[2]) if sys.argv[1:2] == ['-c'] else sys.exit(3)\n"
    )
    fake.chmod(0o755)
    return fake


def _bootstrap(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "bootstrap_venv.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VENV": str(tmp_path / "venv"), **env})


def test_bootstrap_refuses_an_unsupported_python_before_installing(tmp_path):
    for version in ("3.10.13", "3.14.0"):
        done = _bootstrap(tmp_path, PYTHON=str(_fake_python(tmp_path, version)))
        assert done.returncode == 2, done.stderr
        assert f"is CPython {version}" in done.stderr and "3.11, 3.12 and 3.13" in done.stderr
    missing = _bootstrap(tmp_path, PYTHON=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such program" in missing.stderr
    assert not (tmp_path / "venv").exists()


def test_bootstrap_refuses_a_venv_of_another_python(tmp_path):
    other = "3.12.1" if sys.version_info[:2] != (3, 12) else "3.13.0"  # a minor version other than ours
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    os.symlink(_fake_python(tmp_path, other), tmp_path / "venv" / "bin" / "python")
    done = _bootstrap(tmp_path, PYTHON=sys.executable)
    assert done.returncode == 2 and f"was made with Python {other}" in done.stderr, done.stderr


@pytest.fixture
def private(tmp_path) -> Iterator[Path]:
    """A folder only root can enter (like a ``mktemp -d`` clone); not under pytest's tmp dirs, which are
    private to root from the top, so that opening it up (0755) makes it reachable."""
    folder = Path(tempfile.mkdtemp(prefix="atlasflow-test-private-"))
    folder.chmod(0o700)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _checkout(private: Path, *scripts: str) -> Path:
    """A copy of ``scripts`` in a checkout inside ``private``."""
    (private / "repo" / "scripts").mkdir(parents=True)
    for name in scripts:
        shutil.copy2(REPO / "scripts" / name, private / "repo" / "scripts" / name)
    return private / "repo"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the daemons run as their own accounts only under root")


@needs_root
@pytest.mark.parametrize(("script", "variable"), [("local-postgres", "PG_STATE_DIR"), ("local-redis", "REDIS_STATE_DIR")])
def test_server_state_moves_out_of_a_checkout_private_to_root(private, script, variable):
    repo = _checkout(private, script)
    env = {k: v for k, v in os.environ.items() if k != variable}
    state = subprocess.run([str(repo / "scripts" / script), "state"], capture_output=True, text=True, check=True,
                           env=env).stdout.strip()
    name = script.removeprefix("local-")
    assert state.startswith(f"/var/tmp/atlasflow-{name}-"), state
    private.chmod(0o755)  # now the account can enter: the state stays in the checkout
    state = subprocess.run([str(repo / "scripts" / script), "state"], capture_output=True, text=True, check=True,
                           env=env).stdout.strip()
    assert state == f"{repo}/.local-{name}"


def _local_slurm():
    loader = importlib.machinery.SourceFileLoader("local_slurm", str(REPO / "scripts" / "local-slurm"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("local_slurm", loader))
    loader.exec_module(module)
    return module


@needs_root
def test_munge_files_move_out_of_a_checkout_private_to_root(private):
    # `nobody` stands in for `munge` (the package may not be installed yet); the check is the same
    state = _checkout(private) / ".local-slurm"
    state.mkdir()
    munge_dir = _local_slurm().munge_dir
    moved = munge_dir(state, "nobody")
    assert moved.parent == Path("/run") and moved.name.startswith("atlasflow-munge-")
    assert munge_dir(state, "nobody") == moved  # stable: start and a later start agree
    private.chmod(0o755)
    assert munge_dir(state, "nobody") == state / "munge"
