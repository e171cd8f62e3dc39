"""Names shared between DAGs: one constant per Asset, so producer and consumer cannot drift apart.

Only strings here (no Airflow import): the library never imports Airflow, and DAG files wrap
these in ``airflow.sdk.Asset`` themselves.
"""

from __future__ import annotations

__all__ = ["MODEL_CHECKPOINT_URI"]

#: Updated by atlas_ingest's ``publish`` task after the last batch trains; atlas_retrain runs on it.
MODEL_CHECKPOINT_URI = "atlasflow://model/checkpoint"
