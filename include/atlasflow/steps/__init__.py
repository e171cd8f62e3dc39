"""The task functions of the two DAGs (atlas_ingest, atlas_retrain): one library call per task."""
