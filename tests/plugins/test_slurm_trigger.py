from __future__ import annotations

import importlib


def test_trigger_serialize_round_trip():
    from atlasflow_airflow.triggers.slurm import SlurmJobTrigger

    t = SlurmJobTrigger(job_id="12", conn_id="slurm_ssh", stdout_path="/o", stderr_path="/e",
                        result_path="/o.result.json", poll_min_s=1, poll_max_s=60, lost_grace_s=30)
    path, kwargs = t.serialize()
    mod, _, name = path.rpartition(".")
    t2 = getattr(importlib.import_module(mod), name)(**kwargs)
    assert t2.serialize() == (path, kwargs)
    assert kwargs["job_id"] == "12" and kwargs["poll_max_s"] == 60.0
