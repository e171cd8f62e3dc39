"""The storage page's HTML (the app around it is tested in tests/plugins and tests/integration)."""

from __future__ import annotations

import html
import re

from atlasflow.core.config import load_config
from atlasflow.ops.storage_view import render_page, storage_view
from atlasflow.ops.templates import environment
from atlasflow.storage import Ledger

SCRIPT = "<script>alert(1)</script>"


def _config(tmp_path):
    areas = {f"storage.{a}_gb": 0.25 for a in ("data", "models", "cache", "outputs")}
    return load_config(None, overrides={"storage.base_dir": str(tmp_path / "base"), "storage.max_storage_gb": 1.0,
                                        **areas})


def test_every_value_on_the_page_is_escaped(tmp_path):
    config = _config(tmp_path)
    Ledger(config.storage).try_admit(f"batch_0000{SCRIPT}", 5_000_000, owner=f"me{SCRIPT}")
    view = storage_view(config)
    view["batches"] = [{"batch_id": f"b{SCRIPT}", "state": "trained", "datasets": 2, "downloaded": 2, "processed": 1,
                        "quarantined": 1, "cells": 40, "checkpoint": f"/ck/{SCRIPT}"}]
    view["latest_report"] = "/somewhere/report.html"
    page = render_page(view, report_href='report"><script>alert(2)</script>')
    assert "<script" not in page
    # the reservation's batch and owner; the batch row's id, first cell and checkpoint
    assert page.count(html.escape(SCRIPT, quote=False)) == 5
    assert re.search(r'<a id=report href="report&#34;&gt;&lt;script&gt;alert\(2\)&lt;/script&gt;"', page)
    assert '<tr id="b-b&lt;script&gt;alert(1)&lt;/script&gt;"><td>b&lt;script&gt;' in page


def test_the_page_shows_the_budget_and_uses_the_shared_stylesheet(tmp_path):
    config = _config(tmp_path)
    page = render_page(storage_view(config))
    stylesheet = environment().loader.get_source(environment(), "atlasflow.css")[0]
    assert page.count("<style>") == 1 and stylesheet in page and "<link" not in page
    budget = re.search(r"<table id=budget>.*?</table>", page, re.S).group(0)
    assert "<td class=key>1.00 GB</td>" in budget and 'title="0.0 %"' in budget
    assert "No reservation: no batch is holding disk." in page and "No plan yet: trigger atlas_ingest." in page
    assert "No report yet." in page and "cleanup could free: " in page
