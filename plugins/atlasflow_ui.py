"""Registers atlasflow's storage view with the Airflow 3 UI: a FastAPI app under
``/atlasflow/storage`` and a navigation entry that shows it inside the UI (an iframe view)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from atlasflow_airflow.ui.storage_view import URL_PREFIX, create_app


class AtlasflowUIPlugin(AirflowPlugin):
    name = "atlasflow"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "atlasflow storage"}]
    external_views = [{
        "name": "atlasflow storage",
        "href": URL_PREFIX.lstrip("/") + "/",  # relative: Airflow may be served under a base URL
        "url_route": "atlasflow-storage",
        "destination": "nav",
        "category": "browse",
    }]
