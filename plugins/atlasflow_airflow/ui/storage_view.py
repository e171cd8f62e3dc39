"""FastAPI app behind the "atlasflow storage" entry of the Airflow UI.

Thin glue: the data and the page come from :mod:`atlasflow.ops.storage_view`. The config is the
project's config file (as at DAG parse time), read per request so a changed budget shows at once.
Plugin apps are not protected by Airflow by default, so every route requires an Airflow user (the
UI's ``_token`` cookie or a bearer token) whom the auth manager grants ``storage.ui_permission``
(default: reading DAG runs), like the REST API does for its own routes.
"""

from __future__ import annotations

from typing import Any

URL_PREFIX = "/atlasflow/storage"


def access_dependency(permission: str) -> Any:
    """The FastAPI dependency that admits only users holding ``permission`` (``storage.ui_permission``)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api import security as S

    if permission == "authenticated":
        return S.requires_authenticated()
    resource, _, method = permission.partition(":")
    checks = {
        "dag_run": lambda m: S.requires_access_dag(m, DagAccessEntity.RUN),
        "dag": S.requires_access_dag,
        "pool": S.requires_access_pool,
        "variable": S.requires_access_variable,
        "connection": S.requires_access_connection,
        "configuration": S.requires_access_configuration,
    }
    if resource not in checks or method not in ("GET", "POST", "PUT", "DELETE"):
        raise ValueError(f"storage.ui_permission {permission!r} is not resource:method (e.g. dag_run:GET)")
    return checks[resource](method)


def _configured_permission() -> str:
    from atlasflow.core.config import ConfigError, StorageConfig
    from atlasflow_airflow.runtime import parse_time_config

    try:
        return parse_time_config().storage.ui_permission
    except ConfigError:  # a broken config must not open the page: the default is the strict one
        return StorageConfig().ui_permission


def create_app(*, require_login: bool = True, permission: str | None = None) -> Any:
    """The app; ``require_login=False`` only for tests that run it outside an api-server.

    ``permission`` defaults to the config file's ``storage.ui_permission``.
    """
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    from atlasflow.ops.storage_view import latest_report, render_page, storage_view
    from atlasflow_airflow.runtime import parse_time_config

    dependencies = []
    if require_login:
        dependencies.append(Depends(access_dependency(permission or _configured_permission())))
    app = FastAPI(title="atlasflow storage", dependencies=dependencies)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        # relative link: the app is mounted under a prefix, possibly behind a proxy
        return render_page(storage_view(parse_time_config()), report_href="report")

    @app.get("/api")
    def data() -> dict[str, Any]:
        return storage_view(parse_time_config())

    @app.get("/report")
    def report() -> FileResponse:
        path = latest_report(parse_time_config())
        if path is None:
            raise HTTPException(status_code=404, detail="no run report yet")
        return FileResponse(path, media_type="text/html")

    return app
