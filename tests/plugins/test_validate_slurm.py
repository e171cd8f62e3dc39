"""validate_system's SLURM check says how to fill the connection's known_hosts (real SSH server on 127.0.0.1)."""

from __future__ import annotations

import json

from tests.atlasflow.test_security import _SSHServer


def test_slurm_check_prints_the_keyscan_step(tmp_path, monkeypatch):
    from atlasflow_airflow.operators.validate import slurm_reachability

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts that might know the server
    with _SSHServer() as server:
        known = tmp_path / "atlasflow_known_hosts"
        conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": server.port, "login": "atlas",
                "extra": {"known_hosts": str(known)}}
        monkeypatch.setenv("AIRFLOW_CONN_VAL_MISSING", json.dumps(conn))
        step = f"ssh-keyscan -p {server.port} 127.0.0.1 >> {known}"
        missing = slurm_reachability("val_missing")
        assert missing.status == "fail" and step in missing.detail, missing
        # no extra at all: the connection is tried, refused as unknown, and the step is added
        del conn["extra"]["known_hosts"]
        monkeypatch.setenv("AIRFLOW_CONN_VAL_NOEXTRA", json.dumps(conn))
        refused = slurm_reachability("val_noextra")
        assert refused.status == "fail" and "host key is not known" in refused.detail, refused
        assert "has no known_hosts extra" in refused.detail and "ssh-keyscan -p" in refused.detail
        # doing the step gets past host-key verification (this server then refuses every login)
        known.write_text(server.known_hosts_line() + "\n")
        conn["extra"]["known_hosts"] = str(known)
        monkeypatch.setenv("AIRFLOW_CONN_VAL_FILLED", json.dumps(conn))
        filled = slurm_reachability("val_filled")
        assert filled.status == "fail" and "authentication failed" in filled.detail, filled
