from __future__ import annotations

import pytest

from atlasflow.core.config import ConfigError, load_config, run_overridable_keys
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


@pytest.mark.parametrize("key", ["download.sra_command", "download.sra_prefetch_command", "slurm.python",
                                 "slurm.env_activate", "slurm.conn_id", "slurm.remote_workdir", "quant.index",
                                 "genes.vocab_path", "notify.webhook_url", "download.geo_base_url"])
def test_runtime_overrides_may_not_name_programs_paths_or_connections(key):
    for overrides in ({key: "sh -c 'touch /tmp/pwned'"}, {key.split(".")[0]: {key.split(".")[1]: "x"}}):
        with pytest.raises(ConfigError) as info:
            check_runtime_overrides(overrides, "Param config_overrides")
        assert info.value.problems == [
            f"{key} cannot be overridden per run: it names a program, path, URL, connection or recipient, so only "
            "the config file may set it (per-run keys: docs/configuration.md, 'Per-run overrides')"]
    assert key not in run_overridable_keys()


def test_runtime_override_allow_list_covers_legacy_keys_and_leaves_typos_to_the_loader():
    with pytest.raises(ConfigError, match="storage.base_dir cannot be overridden per run"):
        check_runtime_overrides({"base_dir": "/elsewhere"}, "Variable atlasflow_overrides")  # a legacy flat key
    check_runtime_overrides({"slurm.partiton": "gpu"}, "Param")  # a typo: load_config names it as unknown
    with pytest.raises(ConfigError, match="expected a JSON object"):
        check_runtime_overrides(["slurm.python"], "Param")


def test_newline_in_an_allowed_override_is_refused():
    overrides = {"slurm.partition": "gpu\ntouch /tmp/pwned"}
    check_runtime_overrides(overrides, "Param")  # the key is allowed per run, its value is not
    with pytest.raises(ConfigError, match="slurm.partition: contains the control character U\\+000A"):
        load_config(overrides=overrides)


def test_parse_time_plan_never_raises(tmp_path, monkeypatch):
    bad = tmp_path / "c.yaml"
    bad.write_text("plan: {batch_size: zero}\n")
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(bad))
    config, plan, problem = parse_time_plan()
    assert config is None and plan is None and "plan.batch_size" in problem
    bad.write_text(f"manifest: {{path: {tmp_path / 'missing.csv'}}}\n")
    config, plan, problem = parse_time_plan()
    assert config is not None and plan is None and "manifest invalid (1 problems)" in problem
