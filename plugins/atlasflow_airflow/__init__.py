"""Airflow glue for atlasflow: sensors, operators, triggers, hooks, settings bootstrap and UI plugin.

Kept free of heavy imports at module level (ruff TID253): this package is imported on every
DAG parse.
"""
