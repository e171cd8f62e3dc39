from __future__ import annotations

import dataclasses
import json

import pytest

from atlasflow.core.config import AtlasConfig, ConfigError, config_reference, load_config


def test_defaults_follow_the_design_doc():
    c = load_config()
    assert c.storage.max_storage_gb == 550 and c.plan.batch_size == 3
    assert (c.storage.data_gb, c.storage.models_gb, c.storage.cache_gb, c.storage.outputs_gb) == (200, 200, 100, 50)
    assert c.storage.area_bytes()["data"] == 200 * 10**9 and c.storage.max_storage_bytes == 550 * 10**9
    assert c.training.backend == "local"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().plan.batch_size = 4  # type: ignore[misc]


def test_yaml_file_and_relative_paths(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "a.yaml"
    path.write_text("storage:\n  base_dir: data\n  max_storage_gb: 600\nmanifest:\n  path: ../m.xlsx\nplan:\n  batch_size: 5\n")
    c = load_config(path)
    assert c.storage.base_dir == str(tmp_path / "conf" / "data")
    assert c.manifest.path == str(tmp_path / "conf" / "../m.xlsx")
    assert (c.storage.max_storage_gb, c.plan.batch_size) == (600.0, 5)
    assert c.plan_path == tmp_path / "conf" / "data" / "state" / "plan.json"


def test_design_doc_streaming_config_json_loads(tmp_path):
    path = tmp_path / "streaming_config.json"
    path.write_text(json.dumps({"base_dir": "/scratch/u/als", "dataset_list_path": "/home/u/als.xlsx",
                                "batch_size": 3, "max_storage_gb": 550}))
    c = load_config(path)
    assert (c.storage.base_dir, c.manifest.path, c.plan.batch_size) == ("/scratch/u/als", "/home/u/als.xlsx", 3)


def test_env_variable_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("plan: {batch_size: 7}\n")
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(path))
    assert load_config().plan.batch_size == 7


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "storage:\n  max_storage_gb: -1\n  base_dri: x\nplan:\n  batch_size: many\n"
        "training:\n  backend: kubernetes\nqc:\n  max_pct_mito: 120\nsurprise: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    for fragment in ("storage.max_storage_gb: -1 is below the minimum", "storage.base_dri: unknown key",
                     "plan.batch_size: expected int, got 'many'", "training.backend: 'kubernetes' is not one of local, slurm",
                     "qc.max_pct_mito: 120 is above the maximum 100", "surprise: unknown key"):
        assert fragment in text
    assert info.value.source == str(path) and str(path) in str(info.value)


def test_area_allocations_must_fit_the_budget():
    with pytest.raises(ConfigError, match="add up to 550 GB, more than max_storage_gb=500"):
        load_config(overrides={"storage.max_storage_gb": 500})


def test_overrides_dotted_and_nested_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plan: {batch_size: 7}\ntraining: {seed: 3}\n")
    c = load_config(path, overrides={"plan.batch_size": "2", "training": {"backend": "slurm"}})
    assert (c.plan.batch_size, c.training.backend, c.training.seed) == (2, "slurm", 3)
    c2 = c.with_overrides({"slurm.partition": "gpu"})
    assert c2.slurm.partition == "gpu" and c2.plan.batch_size == 2
    with pytest.raises(ConfigError, match="unknown key"):
        c.with_overrides({"slurm.partitoin": "gpu"})


@pytest.mark.parametrize(("text", "fragment"), [("plan: [1, 2", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping"),
                                                 ("plan: 3\n", "plan: expected a mapping")])
def test_malformed_files(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_reference_lists_every_option_with_help():
    rows = config_reference()
    keys = {r["key"] for r in rows}
    def leaves(obj, prefix):  # nested sections (tracking.mlflow) list their own keys
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    expected = set(leaves(AtlasConfig(), ""))
    assert keys == expected and "tracking.mlflow.enabled" in keys
    assert all(r["help"] for r in rows)
    assert next(r for r in rows if r["key"] == "training.backend")["type"] == "'local' | 'slurm'"


def test_quant_section_defaults_and_relative_paths(tmp_path):
    c = load_config()
    assert (c.quant.timeout_s, c.download.timeout_s, c.quant.backend) == (600.0, 1800.0, "local")  # design doc
    path = tmp_path / "atlasflow.yaml"
    path.write_text("quant:\n  index: ref/index.idx\n  t2g: /abs/t2g.txt\n")
    c = load_config(path)
    assert (c.quant.index, c.quant.t2g) == (str(tmp_path / "ref" / "index.idx"), "/abs/t2g.txt")
    with pytest.raises(ConfigError, match="quant.backend: 'cloud' is not one of local, slurm"):
        load_config(overrides={"quant.backend": "cloud"})


@pytest.mark.parametrize("value", ["gpu\ntouch /tmp/pwned", "gpu\r", "a\tb", "a\x00b", "a\u2028b", "a\x85b"])
def test_control_characters_refused_in_every_text_value(tmp_path, value):
    with pytest.raises(ConfigError, match=r"slurm.partition: contains the control character U\+"):
        load_config(overrides={"slurm.partition": value})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"download": {"sra_command": f"fasterq-dump {value} {{accession}}"}}))
    with pytest.raises(ConfigError, match=r"download.sra_command: contains the control character"):
        load_config(path)
    assert load_config(overrides={"slurm.partition": "gpu-a100,gpu_h100"}).slurm.partition == "gpu-a100,gpu_h100"
