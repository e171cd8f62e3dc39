from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.ops.validate import (
    STRATEGIES,
    SystemValidationError,
    apply_memory_strategy,
    choose_memory_strategy,
    recorded_memory_strategy,
    run_checks,
    summarize,
    system_report,
    validate_for_run,
)
from tests.atlasflow.cli.test_cli import run
from tests.atlasflow.conftest import direct_rows


def by_name(checks):
    return {c.name: c for c in checks}


def budget(gb: float) -> dict[str, float]:
    """Overrides for a budget of ``gb``, its areas a quarter each."""
    return {"storage.max_storage_gb": gb, **{f"storage.{a}_gb": gb / 4 for a in ("data", "models", "cache", "outputs")}}


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
    areas = ", ".join(f"{a}_gb: 0.0025" for a in ("data", "models", "cache", "outputs"))
    config.write_text(f"storage: {{base_dir: {tmp_path / 'b'}, min_free_gb: 0, max_storage_gb: 0.01, {areas}}}\n")
    code, out = run("validate-system", "--config", str(config), "--json", "--no-gpu")
    data = json.loads(out)
    assert code == 0 and data["status"] in {"ok", "warn"}
    assert {c["name"] for c in data["checks"]} >= {"python", "disk", "memory", "base_dir", "manifest", "memory_strategy"}
    assert data["memory_strategy"]["name"] in {s.name for s in STRATEGIES}
    assert json.loads((tmp_path / "b" / "state" / "system.json").read_text()) == data  # recorded for the QC steps


def test_budget_beyond_free_disk_fails_the_run_early(tmp_path):
    import shutil

    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "b"), "storage.min_free_gb": 0,
                                    **budget(round(free_gb * 2 + 1))})
    with pytest.raises(SystemValidationError, match="the budget exceeds the free disk") as err:
        validate_for_run(config)
    assert err.value.failed == ["disk"]
    ok = load_config(overrides={"storage.base_dir": str(tmp_path / "b"), "storage.min_free_gb": 0, **budget(0.01)})
    assert by_name(run_checks(ok, gpu=False))["disk"].status == "ok"


def test_held_bytes_count_towards_the_room_for_the_budget(tmp_path):
    """Data the pipeline already keeps under base_dir is part of the budget, not missing free space."""
    import shutil

    (tmp_path / "b").mkdir()
    # 200 MB held, a budget 100 MB above free space: a margin that other writers on a shared disk don't eat
    with open(tmp_path / "b" / "held.bin", "wb") as held:
        held.truncate(200_000_000)
        for offset in range(0, 200_000_000, 4096):  # really allocated, as downloads are
            held.seek(offset)
            held.write(b"x")
    free = shutil.disk_usage(tmp_path).free
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "b"), "storage.min_free_gb": 0,
                                    **budget((free + 100_000_000) / 1e9)})
    disk = by_name(run_checks(config, gpu=False))["disk"]
    assert disk.status == "ok", disk.detail


def test_sra_rows_need_their_tool(tmp_path, manifest_csv):
    header = ["dataset_id", "download_url", "type", "format", "expected_bytes", "technology"]
    rows = [r + [""] for r in direct_rows(1)] + [["srr1", "SRR000001", "sra", "", "", "10xv3"]]
    base = {"storage.base_dir": str(tmp_path / "b"), "manifest.path": str(manifest_csv(rows, header))}
    missing = by_name(run_checks(load_config(overrides={**base, "download.sra_resolver": "sra-tools",
                                                        "download.sra_command":
                                                        "no-such-fasterq-dump {accession} {outdir}"}), gpu=False))
    assert missing["tool:sra"].status == "fail"
    assert "no-such-fasterq-dump is not on PATH" in missing["tool:sra"].detail and "srr1" in missing["tool:sra"].detail
    present = by_name(run_checks(load_config(overrides={**base, "download.sra_command": "true {accession} {outdir}"}),
                                 gpu=False))
    assert present["tool:sra"].status == "ok"
    # auto: without sra-tools the reads come from ENA; the index they are quantified against is missing
    auto = by_name(run_checks(load_config(overrides={**base, "download.sra_command": "no-such-dump {accession}"}),
                              gpu=False))
    assert auto["tool:sra"].status == "ok" and "fetched from ENA" in auto["tool:sra"].detail
    assert auto["quant"].status == "fail" and "atlasflow quant ref" in auto["quant"].detail
    index = tmp_path / "i.idx"
    index.write_bytes(b"x")
    ready = by_name(run_checks(load_config(overrides={**base, "quant.index": str(index), "quant.t2g": str(index)}),
                               gpu=False))
    assert ready["quant"].status == "ok", ready["quant"].detail
    assert "tool:sra" not in by_name(run_checks(load_config(overrides={
        "storage.base_dir": str(tmp_path / "b"), "manifest.path": str(manifest_csv(direct_rows(2), name="d.csv"))}),
        gpu=False))


@pytest.mark.parametrize(("genes", "ram_gib", "expected"), [
    (1_000, 16, "conservative"), (1_000, 256, "conservative"),  # small vocabularies never need more
    (8_000, 32, "moderate"), (8_000, 20, "conservative"),  # stepped down: too little RAM
    (12_000, 46, "split"), (12_000, 40, "moderate"),
    (20_000, 64, "aggressive"), (20_000, 50, "split"), (20_000, 8, "conservative"),
])
def test_memory_strategy_matrix(genes, ram_gib, expected):
    strategy, reason = choose_memory_strategy(genes, int(ram_gib * 2**30))
    assert strategy.name == expected, reason
    assert ("stepped down" in reason) == (expected != choose_memory_strategy(genes, 2**40)[0].name)


def test_recorded_strategy_drives_auto_qc_only(tmp_path):
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "b")})
    assert apply_memory_strategy(config.qc, None) == config.qc
    split = asdict(next(s for s in STRATEGIES if s.name == "split"))
    qc = apply_memory_strategy(config.qc, split)
    assert (qc.strategy, qc.chunk_cells, qc.memory_fraction) == ("chunked", 20_000, 0.5)
    conservative = apply_memory_strategy(config.qc, asdict(STRATEGIES[0]))
    assert (conservative.strategy, conservative.chunk_cells, conservative.memory_fraction) == ("auto", 5_000, 0.25)
    pinned = config.with_overrides({"qc.strategy": "in_memory"}).qc
    assert apply_memory_strategy(pinned, split) == pinned  # an explicit choice wins
    assert recorded_memory_strategy(config) is None
    system_report(config, gpu=False)
    assert recorded_memory_strategy(config)["name"] in {s.name for s in STRATEGIES}


def test_a_vocabulary_other_than_the_pinned_one_fails_validation(tmp_path):
    from atlasflow.prep.genes import Vocabulary

    base = tmp_path / "b"
    small = Vocabulary.builtin("pbmc68k")
    pin = base / "state" / "vocab.json"
    pin.parent.mkdir(parents=True)
    # a pin written before pins named their source: still named, by its genes
    pin.write_text(json.dumps({k: v for k, v in small.to_dict().items() if k != "source"}))
    config = load_config(overrides={"storage.base_dir": str(base)})  # genes.vocab_path: the default, human
    check = by_name(run_checks(config, gpu=False))["vocabulary"]
    assert check.status == "fail"
    assert "builtin:human_grch38_ens100 (version 825072f1f5a0, 19,927 genes)" in check.detail
    assert f"builtin:pbmc68k (version {small.version}, 765 genes)" in check.detail
    assert f"set genes.vocab_path back to builtin:pbmc68k (or to {pin})" in check.detail
    assert "set storage.base_dir to a new folder" in check.detail
    with pytest.raises(SystemValidationError, match="vocabulary: genes.vocab_path asks for builtin:human") as caught:
        validate_for_run(config)
    assert "vocabulary" in caught.value.failed
    fixed = by_name(run_checks(config.with_overrides({"genes.vocab_path": "builtin:pbmc68k"}), gpu=False))
    assert fixed["vocabulary"].status == "ok" and f"pinned in {pin}" in fixed["vocabulary"].detail
    fresh = by_name(run_checks(load_config(overrides={"storage.base_dir": str(tmp_path / "new")}), gpu=False))
    assert fresh["vocabulary"].status == "ok" and "the first run pins it" in fresh["vocabulary"].detail


def test_model_artifacts_check_sizes_the_checkpoint_against_its_reservation():
    from atlasflow.core.config import load_config
    from atlasflow.ops.validate import _model_artifacts

    small = load_config(overrides={"genes.vocab_path": "builtin:pbmc68k", "training.replay_cells": 100})
    ok = _model_artifacts(small)
    assert ok.status == "ok" and "replay reservoir of 100 cells" in ok.detail
    # the human vocabulary with a 200k-cell reservoir needs GBs: a 0.01 GB reservation cannot hold it
    big = load_config(overrides={"storage.checkpoint_gb": 0.01, "training.replay_cells": 200_000})
    warn = _model_artifacts(big)
    assert warn.status == "warn" and "storage.checkpoint_gb" in warn.detail and "training.replay_cells" in warn.detail


def test_known_hosts_check_prints_the_step_that_fills_it(tmp_path):
    import subprocess

    from atlasflow.ops.validate import known_hosts_check

    step = f"ssh-keyscan -p 2222 login.example.org >> {tmp_path / 'kh'}"
    missing = known_hosts_check("login.example.org", 2222, str(tmp_path / "kh"), conn_id="c")
    assert missing.status == "fail" and "not readable" in missing.detail and step in missing.detail
    assert f"ssh-keygen -lf {tmp_path / 'kh'}" in missing.detail
    no_extra = known_hosts_check("login.example.org", 22, None, conn_id="c")
    assert no_extra.status == "fail" and "has no known_hosts extra" in no_extra.detail
    assert "`ssh-keyscan -p 22 login.example.org >> ~/.ssh/atlasflow_known_hosts`" in no_extra.detail
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    (tmp_path / "kh").write_text(f"# a comment\nother.example.org {key}\n")
    other = known_hosts_check("login.example.org", 2222, str(tmp_path / "kh"), conn_id="c")
    assert other.status == "fail" and "has no key for [login.example.org]:2222" in other.detail and step in other.detail
    (tmp_path / "kh").write_text(f"[login.example.org]:2222,[10.0.0.1]:2222 {key}\n")
    assert known_hosts_check("login.example.org", 2222, str(tmp_path / "kh")).status == "ok"
    assert known_hosts_check("login.example.org", 22, str(tmp_path / "kh")).status == "fail"  # another port
    # a file hashed by `ssh-keygen -H` (HashKnownHosts) is read too
    (tmp_path / "kh").write_text(f"login.example.org {key}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(tmp_path / "kh")], check=True, capture_output=True)
    assert (tmp_path / "kh").read_text().startswith("|1|")
    assert known_hosts_check("login.example.org", 22, str(tmp_path / "kh")).status == "ok"
    assert known_hosts_check("login2.example.org", 22, str(tmp_path / "kh")).status == "fail"


def test_reads_rows_without_a_technology_need_the_on_lists(tmp_path, manifest_csv):
    header = ["dataset_id", "download_url", "type", "disease_status", "tissue_type"]
    base = {"storage.base_dir": str(tmp_path / "b"),
            "manifest.path": str(manifest_csv([["srr1", "SRR000001", "sra", "ALS", "spinal_cord"]], header))}
    found = by_name(run_checks(load_config(overrides=base), gpu=False))["chemistry"]
    assert found.status == "ok" and "srr1" in found.detail  # kb-python's own 10x lists are installed
    gone = by_name(run_checks(load_config(overrides={**base, "quant.onlist_10xv2": str(tmp_path / "no.txt")}),
                              gpu=False))["chemistry"]
    assert gone.status == "warn" and "no barcode on-list for 10xv2" in gone.detail


def test_the_ledger_check_names_where_it_lives_and_warns_on_a_shared_filesystem(tmp_path):
    from atlasflow.ops.validate import _ledger, filesystem_type

    base = tmp_path / "base"
    config = load_config(overrides={"storage.base_dir": str(base), "storage.ledger_url_env": None})
    check = _ledger(config)
    assert check.status == "ok" and check.detail.startswith(str(base / "state" / "ledger.sqlite")), check
    mounts = f"/dev/vda / ext4 rw 0 0\nfiler:/export {tmp_path} nfs4 rw 0 0\n"
    assert filesystem_type(base, mounts) == "nfs4" and filesystem_type(Path("/usr"), mounts) == "ext4"
    shared = _ledger(config, mounts)
    assert shared.status == "warn" and "storage.ledger_url" in shared.detail
    # a server ledger that does not answer: failed with the reason, the password never shown
    down = load_config(overrides={"storage.base_dir": str(base),
                                  "storage.ledger_url": "postgresql+psycopg2://u:s3cret@127.0.0.1:9/x"})
    failed = _ledger(down)
    assert failed.status == "fail" and "OperationalError" in failed.detail and "s3cret" not in failed.detail


@pytest.mark.parametrize("device_node", [False, True])
def test_the_gpu_check_imports_torch_only_when_a_gpu_device_exists(tmp_path, device_node):
    """Importing torch (~3 s) is on every run's critical path: without a device node it is skipped."""
    if device_node:
        (tmp_path / "nvidia0").write_text("")  # stands in for /dev/nvidia0
    code = ("import sys; from atlasflow.ops.validate import _accelerator; "
            f"c = _accelerator(({str(tmp_path / 'nvidia[0-9]*')!r},)); print('torch' in sys.modules, c.status, c.detail)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    assert out[0] == str(device_node)
    assert out[1] in ({"ok", "warn"} if device_node else {"warn"})
    if not device_node:
        assert "no GPU device" in out[2] and "runs on the CPU" in out[2]
