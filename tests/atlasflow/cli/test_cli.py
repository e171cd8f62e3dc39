from __future__ import annotations

import io
import json
import subprocess
import sys

from atlasflow.cli.main import main
from tests.atlasflow.conftest import direct_rows


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_manifest_check_valid(manifest_csv):
    path = manifest_csv(direct_rows(3))
    code, out = run("manifest", "check", str(path))
    assert code == 0 and "valid, 3 datasets (3 direct)" in out and "3.0 MB known for 3" in out
    code, out = run("manifest", "check", str(path), "--json")
    data = json.loads(out)
    assert data["valid"] and [d["dataset_id"] for d in data["datasets"]] == ["ds000", "ds001", "ds002"]


def test_manifest_check_passes_the_seed_format(manifest_csv):
    """dataset_id, download_url, type, disease_status, tissue_type, with an sra row and no technology."""
    rows = [["als1", "GSE174332", "geo", "ALS", "motor_cortex"], ["als2", "SRR12345678", "sra", "ALS", "spinal_cord"]]
    path = manifest_csv(rows, ["dataset_id", "download_url", "type", "disease_status", "tissue_type"])
    code, out = run("manifest", "check", str(path))
    assert code == 0 and "valid, 2 datasets (1 geo, 1 sra)" in out


def test_manifest_check_invalid_lists_every_error_one_per_line(manifest_csv, capsys):
    rows = direct_rows(3)
    rows[0][2] = "nope"
    rows[2][0] = "bad id"
    path = manifest_csv(rows)
    code, out = run("manifest", "check", str(path))
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and out == ""
    assert err[0] == f"{path}, row 2, column 'type': unknown type 'nope'; expected one of: geo, direct, sra, cellxgene"
    assert err[1].startswith(f"{path}, row 4, column 'dataset_id': 'bad id' is not a valid id")
    assert err[2] == "2 problem(s); the manifest was not used."


def test_console_script_exit_codes(manifest_csv):
    """The installed `atlasflow` entry point, as a user runs it."""
    exe = [sys.executable, "-m", "atlasflow.cli"]
    ok = subprocess.run([*exe, "manifest", "check", str(manifest_csv(direct_rows(1)))], capture_output=True, text=True)
    bad = subprocess.run([*exe, "manifest", "check", "/nonexistent.csv"], capture_output=True, text=True)
    assert (ok.returncode, bad.returncode) == (0, 2)
    assert "no such file" in bad.stderr


def test_plan_human_and_json(manifest_csv):
    path = manifest_csv(direct_rows(5))
    code, out = run("plan", str(path), "--batch-size", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("batch_0000  2 datasets") and "ds000, ds001" in lines[0]
    assert lines[-1].startswith("3 batches for 5 datasets (batch size 2)")
    code, out = run("plan", str(path), "--batch-size", "2", "--max-batch-gb", "0.0015", "--json")
    data = json.loads(out)
    assert [b["dataset_ids"] for b in data["batches"]][:2] == [["ds000"], ["ds001"]]


def test_plan_save_then_append_and_strict(tmp_path, manifest_csv, capsys):
    state = tmp_path / "plan.json"
    path = manifest_csv(direct_rows(4))
    assert run("plan", str(path), "--batch-size", "3", "--state", str(state), "--save")[0] == 0
    manifest_csv(direct_rows(6))
    code, out = run("plan", str(path), "--batch-size", "3", "--state", str(state))
    assert code == 0 and "[saved]  ds003" in out and "batch_0002  2 datasets" in out and "[new]" in out
    manifest_csv(direct_rows(6)[1:])
    code, _ = run("plan", str(path), "--state", str(state), "--strict")
    assert code == 3 and "dataset 'ds000' removed" in capsys.readouterr().err
    code, out = run("plan", str(path), "--state", str(state), "--fresh")
    assert code == 0 and "0 from the saved plan" in out


def test_plan_uses_config(tmp_path, manifest_csv):
    path = manifest_csv(direct_rows(4))
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {{base_dir: base}}\nmanifest: {{path: {path}}}\nplan: {{batch_size: 4}}\n")
    code, out = run("plan", "--config", str(config), "--save")
    assert code == 0 and out.splitlines()[0].startswith("batch_0000  4 datasets")
    assert (tmp_path / "base" / "state" / "plan.json").is_file()


def test_config_show_and_errors(tmp_path, capsys):
    code, out = run("config", "show")
    assert code == 0 and "storage.max_storage_gb = 550.0" in out
    bad = tmp_path / "c.yaml"
    bad.write_text("plan: {batch_size: 0}\n")
    code, _ = run("config", "show", "--config", str(bad))
    assert code == 2 and "plan.batch_size: 0 is below the minimum 1" in capsys.readouterr().err
    code, _ = run("plan")
    assert code == 2 and "no manifest given" in capsys.readouterr().err


def test_configuration_docs_are_current(repo):
    """docs/configuration.md is generated; regenerate with `atlasflow config docs > docs/configuration.md`."""
    code, out = run("config", "docs")
    assert code == 0 and "| `storage.max_storage_gb` | float | `550.0` | ≥ 0.001 |" in out
    assert (repo / "docs" / "configuration.md").read_text() == out
