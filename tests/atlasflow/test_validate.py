from __future__ import annotations

import json

from atlasflow.config import load_config
from atlasflow.validate import run_checks, summarize

from .conftest import direct_rows
from .test_cli import run


def by_name(checks):
    return {c.name: c for c in checks}


def test_checks_on_this_machine(tmp_path, repo, manifest_csv):
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "base"),
                                    "manifest.path": str(manifest_csv(direct_rows(2)))})
    checks = by_name(run_checks(config, requirements=repo / "requirements.txt"))
    assert checks["python"].status == "ok"
    assert checks["package:torch"].status == "ok" and checks["package:torch"].detail.startswith("2.13.0")
    assert checks["base_dir"].status == "ok" and (tmp_path / "base").is_dir()
    assert checks["manifest"].status == "ok" and "2 datasets" in checks["manifest"].detail
    assert checks["gpu"].status in {"ok", "warn"}  # warn on CPU-only CI, ok on a GPU node


def test_failures_are_reported_not_raised(tmp_path, manifest_csv):
    rows = direct_rows(1)
    rows[0][2] = "bogus"
    blocker = tmp_path / "file"
    blocker.write_text("x")  # base_dir below a regular file cannot be created
    config = load_config(overrides={"storage.base_dir": str(blocker / "base"), "manifest.path": str(manifest_csv(rows)),
                                    "storage.min_free_gb": 10**9})
    checks = by_name(run_checks(config, requirements=None, gpu=False))
    assert checks["base_dir"].status == "fail" and "not writable" in checks["base_dir"].detail
    assert checks["manifest"].status == "fail" and "unknown type 'bogus'" in checks["manifest"].detail
    assert checks["disk"].status == "fail" and "min_free_gb" in checks["disk"].detail
    assert "gpu" not in checks
    assert summarize(list(checks.values()))["status"] == "fail"


def test_version_drift_is_a_warning(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==0.0.1\n")
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "b")})
    numpy = by_name(run_checks(config, requirements=req, gpu=False))["package:numpy"]
    assert numpy.status == "warn" and "0.0.1 tested" in numpy.detail


def test_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {{base_dir: {tmp_path / 'b'}, min_free_gb: 0}}\n")
    code, out = run("validate-system", "--config", str(config), "--json", "--no-gpu")
    data = json.loads(out)
    assert code == 0 and data["status"] in {"ok", "warn"}
    assert {c["name"] for c in data["checks"]} >= {"python", "disk", "memory", "base_dir", "manifest"}
