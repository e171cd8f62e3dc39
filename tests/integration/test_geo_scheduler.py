"""The GEO corpus (real cells in GEO's real layouts) through atlas_ingest under the real local
scheduler: cells before QC per dataset, quarantine reasons naming the file, nothing written outside
the data folders, and no _RAW.tar ever on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlasflow_testing.geo_corpus import build_corpus, write_corpus_config
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.local_airflow import LocalAirflow
from atlasflow_testing.threads import SampledInThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


class TarWatch(SampledInThread):
    """Every path under ``root`` that ever looked like a whole tar (``*.tar``, ``*.tar.part``), sampled."""

    def __init__(self, root: Path, every_s: float = 0.05) -> None:
        super().__init__(every_s=every_s)
        self.root, self.seen = root, set()

    def sample(self) -> None:
        for p in self.root.rglob("*"):
            if p.name.endswith((".tar", ".tar.part")):
                self.seen.add(str(p))


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_geo_corpus_under_the_real_scheduler(tmp_path):
    root = tmp_path / "corpus"
    (root / "www").mkdir(parents=True)
    with GeoServer(root / "www") as server:
        layouts = build_corpus(root / "www" / "geo")
        config_path = write_corpus_config(root, server.url, layouts)
        base = root / "base"
        base.mkdir()
        before = snapshot(root / "www")
        outside = {p.name for p in root.iterdir()}
        af = LocalAirflow(tmp_path / "airflow", config_path)
        af.start()
        try:
            with TarWatch(base) as watch:
                run_id, rc = af.trigger(timeout=1200)
        finally:
            af.stop()
        assert rc == 0, af.log("scheduler")[-4000:]
        tars = [t["path"] for t in server.transfers() if t["path"].endswith("_RAW.tar")]

    state = base / "state"
    for lay in layouts:
        if lay.cells is not None:
            tomb = json.loads((state / "tombstones" / f"{lay.accession}.json").read_text())
            assert tomb["cells_before"] == lay.cells, (lay.accession, lay.what)
        else:
            quar = json.loads((state / "quarantine" / f"{lay.accession}.json").read_text())
            assert quar["stage"] == lay.stage and all(w in quar["reason"] for w in lay.reason), quar
    # each RAW.tar streamed once, and no tar (or part of one) ever sat on disk
    assert sorted(tars) == sorted(set(tars)) and len(tars) == 3
    assert not watch.seen, watch.seen
    # nothing written outside the data folders: the served files are untouched, the corpus root
    # gained only base_dir, and base_dir holds only its own areas
    assert snapshot(root / "www") == before
    assert {p.name for p in root.iterdir()} - outside == set()
    assert {p.name for p in base.iterdir()} <= {"data", "models", "cache", "outputs", "state", "reports", "logs"}
    assert not list((base / "data" / "raw").rglob("*.h5")), "raw downloads are deleted once processed"
    # the run report lists the files GEO's rules skipped, with reasons
    page = Path(json.loads((base / "reports" / "latest.json").read_text())["html"]).read_text()
    assert "Files not fetched" in page and "GSM9100011_tsne.png" in page
