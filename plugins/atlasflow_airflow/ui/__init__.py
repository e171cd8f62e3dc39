"""The atlasflow pages of the Airflow UI (FastAPI apps registered by ``plugins/atlasflow_ui.py``)."""
