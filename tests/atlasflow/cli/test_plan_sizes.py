"""`atlasflow plan` on a seed-format manifest shows each batch's size and which rows fall back to
storage.unknown_size_gb (marked), after asking the sources (cached under state/)."""

from __future__ import annotations

import io
import json

from atlasflow.cli.main import main
from atlasflow_testing.seed import served_seed


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_plan_shows_probed_sizes_and_marks_the_default(tmp_path):
    with served_seed(tmp_path) as (server, info):
        cfg = str(tmp_path / "atlasflow.yaml")
        code, out = run("plan", "--config", cfg)
        assert code == 0
        lines = out.splitlines()
        total = info["bytes"]["seed_direct"] + info["bytes"]["seed_geo"] + int(0.02e9)
        assert lines[0].startswith("batch_0000  3 datasets") and f"{total / 1e6:.1f} MB*" in lines[0]
        assert "sizes: 1 from default, 1 from geo, 1 from head" in out
        assert "* storage.unknown_size_gb (0.02 GB) assumed for 1 row(s)" in out
        assert "seed_gone: HTTP 404" in out
        hits = server.hits("/files/seed_direct.h5ad")
        code, out = run("plan", "--config", cfg, "--json")
        sizes = json.loads(out)["sizes"]
        assert sizes["seed_direct"] == {"bytes": info["bytes"]["seed_direct"], "source": "head"}
        assert sizes["seed_gone"]["source"] == "default"
        assert server.hits("/files/seed_direct.h5ad") == hits  # cached in state/sizes.json
    # --no-probe on a fresh base: nothing asked, every row at the default
    code, out = run("plan", str(tmp_path / "manifest.csv"), "--no-probe")
    assert code == 0 and "sizes: 3 from default" in out and "not asked (--no-probe)" in out
