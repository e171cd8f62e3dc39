"""No connection secret in task logs, XCom, the job's environment or its log files (security review, #8).

A real SLURM job submitted through a real sshd with a connection whose every secret is used for real:
an inline, passphrase-encrypted private key (extra ``private_key`` + ``private_key_passphrase``) and a
password. Then every output of the run is scanned for each secret.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import conn_uri
from .test_slurm_ssh import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
RUNNER = """
import json, sys
from tests.integration.test_slurm_ssh import _dag, _ti
ti = _ti(_dag(json.loads(sys.argv[1])).test())
print("RESULT=" + json.dumps({"state": ti.state, "xcom": ti.xcom_pull(task_ids="train")}), flush=True)
"""
JOB = r'''
import json, os, sys
print("job environment:", json.dumps(dict(os.environ), sort_keys=True), flush=True)
path = os.environ["ATLASFLOW_RESULT_PATH"]
with open(path + ".tmp", "w") as f:
    json.dump({"checkpoint": sys.argv[1]}, f)
os.replace(path + ".tmp", path)
'''


def test_connection_secrets_never_reach_logs_xcom_or_the_job(slurm_airflow, tmp_path, monkeypatch):
    passphrase, password = f"pass-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    key = tmp_path / "encrypted_key"
    shutil.copy(slurm_airflow["key_file"], key)
    key.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", passphrase, "-f", str(key)], check=True, capture_output=True)
    private_key = key.read_text()
    conn = json.loads(conn_uri(slurm_airflow))
    del conn["extra"]["key_file"]  # only the inline, encrypted key can log in
    conn["password"] = password
    conn["extra"].update(private_key=private_key, private_key_passphrase=passphrase)
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_SECRET", json.dumps(conn))
    secrets = [passphrase, password, private_key.strip().splitlines()[1]]  # a line of the key body

    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "out"
    task = dict(command=[sys.executable, str(script), "ckpt"], dataset_id="sec", batch_id="b1", output_dir=str(out),
                slurm={**FAST, "conn_id": "slurm_secret"})
    # in a child process at INFO, Airflow's default (this session logs at WARNING): every log line the task,
    # the hook, paramiko and the trigger write is captured. Not DEBUG: Airflow 3.3.2's task supervisor then
    # logs its MaskSecret messages, i.e. the secrets themselves (docs/security.md).
    env = {**os.environ, "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(task)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=200)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    result = json.loads(logs.split("RESULT=", 1)[1].splitlines()[0])
    assert result["state"] == "success", logs[-4000:]  # the secrets were used: the key opens only with the passphrase
    # the scan reads real logs: the task's, including the tail of the job's stdout (its whole environment)
    assert "SLURM job" in logs and "job environment:" in logs and "ATLASFLOW_RESULT_PATH" in logs
    xcom = json.dumps(result["xcom"])
    job_files = {p: p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()}
    assert any("job environment:" in text for text in job_files.values())  # the job's own output was scanned
    # whatever Airflow wrote under its home (task logs, when written to files)
    airflow_logs = {p: p.read_text(errors="replace") for p in Path(os.environ["AIRFLOW_HOME"]).rglob("*.log")
                    if p.is_file()}
    for secret in secrets:
        assert secret not in logs, "secret in task log output"
        assert secret not in xcom, "secret in XCom"
        for path, text in {**job_files, **airflow_logs}.items():
            assert secret not in text, f"secret in {path}"
