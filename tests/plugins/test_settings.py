from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlasflow_airflow.settings import SettingsError, parse_settings

REPO = Path(__file__).resolve().parents[2]


def test_project_settings_file_declares_pools_connection_variables():
    s = parse_settings(REPO / "airflow_settings.yaml")
    pools = {p.name: p for p in s.pools}
    assert (pools["downloads"].slots, pools["downloads"].include_deferred) == (5, False)
    assert (pools["gpu"].slots, pools["gpu"].include_deferred) == (1, True)
    assert (pools["quant"].slots, pools["quant"].include_deferred) == (2, True)
    (conn,) = s.connections
    assert conn.conn_id == "slurm_ssh" and conn.conn_type == "ssh" and conn.password is None
    assert conn.extra["no_host_key_check"] is False and "key_file" in conn.extra
    # the host key is verified against a file the placeholder names; validate_system prints how to fill it
    from atlasflow.ops.validate import known_hosts_check

    check = known_hosts_check(conn.host, conn.port, conn.extra["known_hosts"], conn_id=conn.conn_id)
    assert check.status == "fail" and (f"ssh-keyscan -p 22 login.cluster.example.org >> {conn.extra['known_hosts']}"
                                       in check.detail)
    assert f"ssh-keyscan -p 22 login.cluster.example.org >> {conn.extra['known_hosts']}" in (
        REPO / "airflow_settings.yaml").read_text()
    assert {v.key for v in s.variables} == {"atlasflow_overrides"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("airflow: [", "not valid YAML"),
        ("pools: []\n", "top-level 'airflow:'"),
        ("airflow:\n  pools:\n    - pool_name: p\n      pool_slot: many\n", "pool_slot must be an integer"),
        ("airflow:\n  pools:\n    - {pool_name: p, pool_slot: 1, include_deferred: yes-please}\n", "include_deferred"),
        ("airflow:\n  pools:\n    - {pool_name: p, pool_slot: 1}\n    - {pool_name: p, pool_slot: 2}\n", "duplicate pool"),
        ("airflow:\n  connections:\n    - {conn_id: c}\n", "conn_type is required"),
        ("airflow:\n  connections:\n    - {conn_id: c, conn_type: ssh, conn_port: 99999}\n", "conn_port"),
        ("airflow:\n  variables:\n    - {variable_value: 1}\n", "variable_name"),
        ("airflow:\n  pool:\n    - {}\n", "unknown key 'pool'"),
        ("airflow:\n  pools:\n    - {pool_name: p, pool_slots: 1}\n", "unknown key 'pool_slots'"),
    ],
)
def test_malformed_settings_are_clear_errors(tmp_path, text, fragment):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        parse_settings(path)
    assert any(fragment in p for p in info.value.problems), info.value.problems


def _env() -> dict[str, str]:
    # an AIRFLOW_CONN_SLURM_SSH set by another test would shadow the DB connection under test
    return {k: v for k, v in os.environ.items() if k != "AIRFLOW_CONN_SLURM_SSH"} | {"PYTHONPATH": str(REPO / "plugins")}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = _env()
    return subprocess.run([sys.executable, "-m", "atlasflow_airflow.settings", *args], capture_output=True, text=True, env=env)


def test_check_command_exit_codes(tmp_path):
    assert _run("check", str(REPO / "airflow_settings.yaml")).returncode == 0
    bad = tmp_path / "s.yaml"
    bad.write_text("airflow:\n  pools:\n    - {pool_name: p}\n")
    result = _run("check", str(bad))
    assert result.returncode == 2 and "pool_slot" in result.stderr


@pytest.fixture
def forget_overrides():
    """The applied ``atlasflow_overrides`` Variable lives in the session's shared metadata DB: remove it
    afterwards, or a later DAG test reads this file's placeholder as its run settings."""
    yield
    subprocess.run([sys.executable, "-m", "airflow", "variables", "delete", "atlasflow_overrides"],
                   capture_output=True, text=True, env=_env())


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.slow
def test_apply_is_idempotent_against_a_real_metadata_db(tmp_path, forget_overrides):
    first = _run("apply", str(REPO / "airflow_settings.yaml"))
    assert first.returncode == 0, first.stderr
    assert "connection slurm_ssh (ssh) created" in first.stdout or "connection slurm_ssh (ssh) updated" in first.stdout
    changed = tmp_path / "s.yaml"
    changed.write_text((REPO / "airflow_settings.yaml").read_text().replace("pool_slot: 5", "pool_slot: 7"))
    second = _run("apply", str(changed))
    assert second.returncode == 0 and "connection slurm_ssh (ssh) updated" in second.stdout
    assert "secret" not in second.stdout

    pools = subprocess.run([sys.executable, "-m", "airflow", "pools", "list", "-o", "json"], capture_output=True,
                           text=True, check=True, env=_env())
    by_name = {p["pool"]: p for p in json.loads(pools.stdout)}
    assert int(by_name["downloads"]["slots"]) == 7 and int(by_name["gpu"]["slots"]) == 1
    assert str(by_name["gpu"]["include_deferred"]).lower() == "true"
    conn = subprocess.run([sys.executable, "-m", "airflow", "connections", "get", "slurm_ssh", "-o", "json"],
                          capture_output=True, text=True, check=True, env=_env())
    info = json.loads(conn.stdout)[0]
    extra = info["extra_dejson"]
    assert str((extra if isinstance(extra, dict) else json.loads(extra))["no_host_key_check"]) == "False"
    assert info["host"] == "login.cluster.example.org" and int(info["port"]) == 22
