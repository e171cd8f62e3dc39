"""The storage view's app and page without an api-server (the real-UI check is in tests/integration)."""

from __future__ import annotations

import json

import pytest

from atlasflow.core.config import load_config
from atlasflow.ops.storage_view import latest_report, render_page, storage_view
from atlasflow.storage import Ledger


@pytest.fixture
def config(tmp_path, monkeypatch):
    areas = {f"storage.{a}_gb": 0.25 for a in ("data", "models", "cache", "outputs")}
    path = tmp_path / "atlasflow.yaml"
    path.write_text(json.dumps({"storage": {"base_dir": str(tmp_path / "base"), "max_storage_gb": 1.0,
                                            **{k.split(".")[1]: v for k, v in areas.items()}}}))
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(path))
    return load_config(path)


def _client():
    from fastapi.testclient import TestClient

    from atlasflow_airflow.ui.storage_view import create_app

    return TestClient(create_app(require_login=False))


def test_page_and_json_show_the_ledger(config):
    Ledger(config.storage).try_admit("batch_0000", 123_000_000, paths=[], owner="<script>alert(1)</script>")
    client = _client()
    data = client.get("/api").json()
    assert data["budget_bytes"] == 1_000_000_000 and data["reservations"][0]["bytes"] == 123_000_000
    page = client.get("/").text
    assert "1.00 GB" in page and "123.00 MB" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # owner is escaped
    assert "No report yet." in page and client.get("/report").status_code == 404


def test_report_link_serves_only_files_under_reports(config, tmp_path):
    reports = tmp_path / "base" / "reports"
    (reports / "r1").mkdir(parents=True)
    (reports / "r1" / "report.html").write_text("<html>the report</html>")
    outside = tmp_path / "secret.html"
    outside.write_text("not yours")
    client = _client()
    for target, served in ((reports / "r1" / "report.html", True), (outside, False),
                           (reports / "r1" / ".." / ".." / ".." / "secret.html", False)):
        (reports / "latest.json").write_text(json.dumps({"run_id": "r1", "html": str(target)}))
        assert (latest_report(config) is not None) == served, target
        reply = client.get("/report")
        assert (reply.status_code, reply.text if served else None) == ((200, "<html>the report</html>") if served
                                                                       else (404, None))
    assert 'href="report"' not in render_page(storage_view(config))  # the last pointer was refused


def test_the_app_requires_a_logged_in_user_by_default():
    from atlasflow_airflow.ui.storage_view import create_app

    app = create_app()
    assert app.router.dependencies, "plugin apps are public unless they ask for a user"


@pytest.fixture
def tokens(airflow_db, monkeypatch):
    """JWTs of Airflow's own (simple) auth manager, one per role; ``None``: logged in without a role."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    manager = create_auth_manager()
    return {role: manager.generate_jwt(SimpleAuthManagerUser(username=f"u-{role}", role=role))
            for role in (None, "viewer", "op", "admin")}


def _status(app, token: str | None) -> int:
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return TestClient(app).get("/api", headers=headers).status_code


@pytest.mark.slow
def test_the_page_requires_the_configured_permission(config, tokens, tmp_path, monkeypatch):
    from atlasflow_airflow.ui.storage_view import create_app

    default = create_app()  # storage.ui_permission from the config file: dag_run:GET
    assert _status(default, None) == 401
    assert _status(default, tokens[None]) == 403  # logged in, but may not read DAG runs
    assert _status(default, tokens["viewer"]) == _status(default, tokens["op"]) == 200
    # a stricter setting in the config file: variables are for Op and up under the simple auth manager
    path = tmp_path / "strict.yaml"
    path.write_text(json.dumps({"storage": {**config.to_dict()["storage"], "ui_permission": "variable:GET"}}))
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(path))
    strict = create_app()
    assert _status(strict, tokens["viewer"]) == 403 and _status(strict, tokens["op"]) == 200
    assert _status(create_app(permission="authenticated"), tokens[None]) == 200


def test_ui_permission_is_validated():
    from atlasflow.core.config import ConfigError

    with pytest.raises(ConfigError, match="storage.ui_permission: 'dag_run:GETX' is not one of"):
        load_config(overrides={"storage.ui_permission": "dag_run:GETX"})
