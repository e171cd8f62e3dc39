"""``atlasflow manifest from-geo``: a series as one row, or one GSM row per sample, from GEO's records."""

from __future__ import annotations

import io
import json

from atlasflow.cli.main import main
from atlasflow.intake.manifest import read_manifest
from atlasflow_testing.geo_corpus import publish_soft
from atlasflow_testing.geo_server import GeoServer


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_series_rows_one_dataset_or_one_per_sample(tmp_path):
    www = tmp_path / "www"
    publish_soft(www / "geo", "GSE920001", {"GSM9200011": "Homo sapiens", "GSM9200012": "Homo sapiens",
                                            "GSM9200013": "Mus musculus", "GSM9200014": "Homo sapiens"},
                 no_files=("GSM9200014",))
    with GeoServer(www) as server:
        cfg = tmp_path / "atlasflow.yaml"
        cfg.write_text(f"download:\n  geo_base_url: {server.url}/geo\n")
        code, out = run("manifest", "from-geo", "GSE920001", "--config", str(cfg), "--per-sample", "--organism",
                        "human", "--tissue", "blood", "--json")
        assert code == 0
        got = json.loads(out)
        assert [r["dataset_id"] for r in got["rows"]] == ["GSM9200011", "GSM9200012"]
        assert all(r["download_url"] == r["dataset_id"] and r["species"] == "Homo sapiens" for r in got["rows"])
        assert got["left_out"] == ["GSM9200013: organism Mus musculus",
                                   "GSM9200014: no supplementary files (reads only, or data in the series files)"]
        out_file = tmp_path / "m.csv"
        code, _ = run("manifest", "from-geo", "GSE920001", "--config", str(cfg), "--organism", "human",
                      "--out", str(out_file))
        assert code == 0
        (row,) = list(read_manifest(out_file))  # passes `atlasflow manifest check`
        assert row.dataset_id == "GSE920001" and row.type == "geo" and row.species == "Homo sapiens"
        code, _ = run("manifest", "from-geo", "GSE999999", "--config", str(cfg))
        assert code == 2  # GEO has no record of it
    assert run("manifest", "from-geo", "GSM1")[0] == 2
