"""FastAPI app behind the "atlasflow storage" entry of the Airflow UI.

Thin glue: the data and the page come from :mod:`atlasflow.ops.storage_view`. The config is the
project's config file (as at DAG parse time), read per request so a changed budget shows at once.
Plugin apps are not protected by Airflow by default, so every route requires a logged-in Airflow
user (the UI's ``_token`` cookie or a bearer token), like the REST API.
"""

from __future__ import annotations

from typing import Any

URL_PREFIX = "/atlasflow/storage"


def create_app(*, require_login: bool = True) -> Any:
    """The app; ``require_login=False`` only for tests that run it outside an api-server."""
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    from atlasflow.ops.storage_view import latest_report, render_page, storage_view
    from atlasflow_airflow.runtime import parse_time_config

    dependencies = []
    if require_login:
        from airflow.api_fastapi.core_api.security import requires_authenticated

        dependencies.append(Depends(requires_authenticated()))
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
