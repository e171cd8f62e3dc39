"""Security review of issue #8, one test (or group) per point.

Already proven elsewhere, not repeated here:

- archives: ``..`` members (tests/atlasflow/data/test_process.py::test_tar_with_parent_member_is_refused),
  symlink / absolute / oversized members (``::test_unsafe_tar_members``); hard links and devices below.
- a wrong host key is refused by a real sshd, in the worker's and the triggerer's SSH client
  (tests/integration/test_slurm_ssh.py::test_wrong_host_key_is_refused, root only); the default
  without any known_hosts entry is tested below without root.
- no secret in task logs / XCom of a real SLURM run: tests/integration/test_secrets.py (root only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from atlasflow.acquire.fetch import fetch_dataset
from atlasflow.core.config import DownloadConfig
from atlasflow.intake.manifest import Dataset, ManifestError, read_manifest
from atlasflow.readers.formats import FormatError, safe_extract
from atlasflow.slurm.spec import JobSpec, render_sbatch

from .conftest import write_csv

REPO = Path(__file__).resolve().parents[2]
# what an attacker would put in a spreadsheet cell to reach a shell
HOSTILE = ["$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "a && touch PWNED", "a | touch PWNED",
           "'; touch PWNED; '", '"; touch PWNED; "', "a\ntouch PWNED", "${IFS}touch${IFS}PWNED", "> PWNED"]


# ---- 1. secrets live only in Airflow connections / the environment ------------------------------------------


def test_no_secret_in_tracked_files():
    """No private key, password or token is committed; the SSH connection in airflow_settings.yaml is key-based
    with an empty password, and the pipeline config has no credential keys at all."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", "ignore")
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), name
    settings = yaml.safe_load((REPO / "airflow_settings.yaml").read_text())["airflow"]
    for conn in settings["connections"]:
        assert not conn.get("conn_password"), conn["conn_id"]
        assert not {"private_key", "password", "private_key_passphrase"} & set(conn.get("conn_extra") or {})
    from atlasflow.core.config import config_reference

    keys = [row["key"] for row in config_reference()]
    assert not [k for k in keys if re.search(r"password|secret|token|passphrase|private_key", str(k), re.I)]


# ---- 2. SSH host keys are verified by default -----------------------------------------------------------------


class _SSHServer:
    """A real SSH server (asyncssh) on 127.0.0.1 with a fresh host key, accepting no login."""

    def __init__(self) -> None:
        import asyncssh

        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncssh

        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.key], password_auth=False, public_key_auth=False,
            kbdint_auth=False))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> _SSHServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.key.export_public_key().decode().split()[0]} " + \
            self.key.export_public_key().decode().split()[1]


@pytest.mark.slow


def test_host_key_is_verified_by_default(tmp_path, monkeypatch):
    """A connection that says nothing about host keys refuses an unknown server before authenticating."""
    import paramiko

    from atlasflow_airflow.hooks.slurm import SlurmHook

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts to fall back on
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with _SSHServer() as server:
        conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": server.port, "login": "atlas",
                "extra": {"key_file": str(key)}}
        monkeypatch.setenv("AIRFLOW_CONN_SEC_DEFAULT", json.dumps(conn))
        hook = SlurmHook("sec_default", transient_retries=0)
        assert hook.no_host_key_check is False and hook.host_key is None
        with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
            hook.get_conn()
        # control: with the server's key in a known_hosts extra the same connection gets past the host
        # check and fails only at authentication (the server accepts no login)
        known = tmp_path / "known_hosts"
        known.write_text(server.known_hosts_line() + "\n")
        conn["extra"]["known_hosts"] = str(known)
        monkeypatch.setenv("AIRFLOW_CONN_SEC_KNOWN", json.dumps(conn))
        with pytest.raises(paramiko.AuthenticationException):
            SlurmHook("sec_known", transient_retries=0).get_conn()


# ---- 3. archives are extracted safely ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hardlink", "device", "fifo"])
def test_tar_links_and_devices_are_refused(tmp_path, kind):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        data = tarfile.TarInfo("ok.txt")
        data.size = 2
        tar.addfile(data, io.BytesIO(b"ok"))
        info = tarfile.TarInfo("member")
        info.type = {"hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        if kind == "hardlink":
            info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(FormatError, match="links and devices are not extracted"):
        safe_extract(archive, tmp_path / "out", max_member_bytes=10**6)
    assert not (tmp_path / "out" / "member").exists()


# ---- 4. manifest fields never reach a shell ---------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_identifier_columns_refuse_shell_metacharacters(tmp_path, value):
    """dataset_id becomes a folder and a job name; sra/geo accessions become arguments: all are validated."""
    rows = [[f"ds{value}", "https://h.org/x.h5ad", "direct", "", "", ""],
            ["ok1", f"SRR1{value}", "sra", "", "", "10xv3"],
            ["ok2", f"GSE1{value}", "geo", "", "", ""]]
    header = ["dataset_id", "download_url", "type", "format", "expected_bytes", "technology"]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_csv(tmp_path / "m.csv", rows, header))
    # (row numbers are physical lines: a quoted newline shifts the later ones, so compare columns)
    flagged = sorted(p.column for p in info.value.problems)
    assert flagged == ["dataset_id", "download_url", "download_url"], info.value.problems


def test_sbatch_script_passes_hostile_values_to_the_program_literally(tmp_path):
    """Every value in the rendered script is quoted: bash hands each one to the program unchanged and runs
    nothing else. (The train job's argv holds paths, not manifest text; this is the worst case.) A value with a
    control character is refused before rendering (tests/atlasflow/slurm/test_builders.py); the rest pass."""
    printable = [value for value in HOSTILE if value.isprintable()]
    assert len(printable) == len(HOSTILE) - 1
    out = tmp_path / "argv.json"
    recorder = ["python3", "-c", "import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))", str(out)]
    spec = JobSpec(dataset_id="x; touch PWNED", batch_id="$(touch PWNED)", command=(*recorder, *printable),
                   output_dir=str(tmp_path / "logs $(touch PWNED)"), tag="t", workdir=str(tmp_path),
                   env={"NOTES": "$(touch PWNED)`touch PWNED`"}, partition="gpu; touch PWNED")
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(spec))
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())[1:] == printable
    assert not list(tmp_path.rglob("PWNED"))
    with pytest.raises(ValueError, match="control character U\\+000A"):
        render_sbatch(dataclasses.replace(spec, command=(*recorder, *HOSTILE)))


def test_sra_accession_is_one_argument_never_shell_parsed(tmp_path):
    """Even an accession that slipped past validation reaches the tool as a single argv element."""
    tool = tmp_path / "fake-dump"
    tool.write_text("#!/usr/bin/env python3\nimport json, sys, pathlib\n"
                    "out = pathlib.Path(sys.argv[sys.argv.index('--outdir') + 1])\n"
                    "(out / 'argv.json').write_text(json.dumps(sys.argv[1:]))\n"
                    "(out / 'reads_1.fastq').write_text('@r\\nACGT\\n+\\nIIII\\n')\n")
    tool.chmod(0o755)
    for i, value in enumerate(HOSTILE):
        dest = tmp_path / f"raw{i}"
        ds = Dataset(f"s{i}", f"SRR1{value}", "sra", 2, technology="10xv3")
        fetch_dataset(ds, dest, config=DownloadConfig(sra_command=f"{tool} --outdir {{outdir}} {{accession}}"))
        assert json.loads((dest / "argv.json").read_text()) == ["--outdir", str(dest), f"SRR1{value}"]
    assert not list(tmp_path.rglob("PWNED")) and not Path(os.getcwd(), "PWNED").exists()
