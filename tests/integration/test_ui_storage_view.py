"""The storage view in the real Airflow UI: a running api-server serves the plugin, a real headless
Chromium logs in with a real token and renders both the page and the UI page that frames it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.ops.report import write_run_report
from atlasflow.steps import ingest as P
from atlasflow.storage import Ledger
from atlasflow_testing.chromium import Chromium, ensure_chromium
from atlasflow_testing.demo import build_demo
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.local_airflow import LocalAirflow

# a test never writes into the checkout: the README's screenshot is refreshed only on request
SCREENSHOTS = os.environ.get("ATLASFLOW_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = ensure_chromium()
    if not found:
        pytest.skip("chromium is not installed and we are not root to apt-get it (CI runs as root)")
    return found


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_storage_view_renders_in_the_airflow_ui(tmp_path, chromium):
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_demo(tmp_path, server.url, n_datasets=4, cells=40, batch_size=2, budget_mb=40, missing_row=False)
        config = load_config(tmp_path / "atlasflow.yaml")
        P.prepare_run(config)
        ids = [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, "batch_0000")).read_text())["datasets"]]
        admitted = P.admit_batch(config, "batch_0000", owner="test")
        assert admitted["admitted"]
        P.process_dataset_step(config, "batch_0000", P.download_dataset(config, "batch_0000", ids[0], final_try=True))
    written = write_run_report(config, "manual__ui-test")
    reservation = Ledger(config.storage).reservations()[0]

    af = LocalAirflow(tmp_path / "airflow", tmp_path / "atlasflow.yaml")
    af.start()
    try:
        base, token = af.api_url, af.token()
        plugins = json.loads(_get(base + "/api/v2/plugins", token)[1])["plugins"]
        ours = next(p for p in plugins if p["name"] == "atlasflow")
        assert ours["fastapi_apps"][0]["url_prefix"] == "/atlasflow/storage"
        assert ours["external_views"][0]["url_route"] == "atlasflow-storage"
        # plugin apps are not protected by Airflow on their own: ours refuses anonymous requests
        assert _get(base + "/atlasflow/storage/")[0] in (401, 403)
        status, data = _get(base + "/atlasflow/storage/api", token)
        assert status == 200 and json.loads(data)["budget_bytes"] == config.storage.max_storage_bytes

        with Chromium(chromium) as browser:
            browser.set_cookie(base, "_token", token)  # what the UI's login sets
            browser.open(base + "/atlasflow/storage/")
            text = browser.wait_for("document.readyState === 'complete' && document.body.innerText")
            shot = browser.screenshot(tmp_path / "storage_view.png")
            assert "atlasflow storage" in text and "40.00 MB" in text  # the budget
            assert "batch_0000" in text and f"{reservation.bytes / 1e6:,.2f} MB" in text  # the reservation
            batches = browser.evaluate("[...document.querySelectorAll('#batches tr')].slice(1)"
                                       ".map(r => [...r.cells].map(c => c.innerText))")
            assert [b[:2] for b in batches] == [["batch_0000", "processing"], ["batch_0001", "waiting"]]
            assert batches[0][2:6] == ["2", "1", "1", "0"]  # datasets, downloaded, processed, quarantined
            href = browser.evaluate("document.querySelector('#report').href")
            assert href == base + "/atlasflow/storage/report"
            status, page = _get(href, token)
            assert status == 200 and page == Path(written["html"]).read_text()

            # inside the Airflow UI: the nav entry's route frames the page
            browser.open(base + "/plugin/atlasflow-storage")
            framed = browser.wait_for("(() => { const f = document.querySelector('iframe');"
                                      " return f && f.contentDocument && f.contentDocument.body"
                                      " && f.contentDocument.body.innerText.includes('Reservations')"
                                      " && f.contentDocument.body.innerText; })()", timeout=90)
            assert framed and "batch_0000" in framed, browser.evaluate("document.body.innerText")
            ui = browser.screenshot(tmp_path / "storage_view_in_airflow.png")
        for png in (shot, ui):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            (Path(SCREENSHOTS) / "ui_storage_view.png").write_bytes(ui.read_bytes())
    finally:
        af.stop()
