from __future__ import annotations

import pytest

from atlasflow.core.config import ConfigError
from atlasflow_airflow.runtime import check_runtime_overrides, parse_time_plan


def test_runtime_overrides_may_not_reshape_the_dag():
    check_runtime_overrides({"training.backend": "slurm", "qc": {"min_genes": 100}}, "Param")
    with pytest.raises(ConfigError) as info:
        check_runtime_overrides({"plan.batch_size": 1, "storage": {"base_dir": "/x", "max_storage_gb": 9},
                                 "manifest": {"path": "m.csv"}}, "Param config_overrides")
    assert info.value.problems == [
        f"{k} cannot be overridden per run: it shapes the DAG and is read from the config file at parse time"
        for k in ("manifest.path", "plan.batch_size", "storage.base_dir")
    ]
    assert info.value.source == "Param config_overrides"


def test_parse_time_plan_never_raises(tmp_path, monkeypatch):
    bad = tmp_path / "c.yaml"
    bad.write_text("plan: {batch_size: zero}\n")
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(bad))
    config, plan, problem = parse_time_plan()
    assert config is None and plan is None and "plan.batch_size" in problem
    bad.write_text(f"manifest: {{path: {tmp_path / 'missing.csv'}}}\n")
    config, plan, problem = parse_time_plan()
    assert config is not None and plan is None and "manifest invalid (1 problems)" in problem
