from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

HEADER = ["dataset_id", "download_url", "type", "format", "expected_bytes"]


def write_csv(path: Path, rows: Sequence[Sequence[Any]], header: Sequence[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_xlsx(path: Path, rows: Sequence[Sequence[Any]], header: Sequence[str] = HEADER, *,
               sheet: str = "datasets", extra_sheets: Sequence[str] = ()) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    ws = book.active
    ws.title = sheet
    ws.append(list(header))
    for row in rows:
        ws.append(list(row))
    for name in extra_sheets:
        book.create_sheet(name).append(["unrelated"])
    book.save(path)
    return path


def direct_rows(n: int, start: int = 0, size: int | None = 1_000_000) -> list[list[Any]]:
    return [[f"ds{i:03d}", f"https://example.org/files/ds{i:03d}.h5ad", "direct", "", size] for i in range(start, start + n)]


@pytest.fixture
def manifest_csv(tmp_path: Path):
    def make(rows: Sequence[Sequence[Any]], header: Sequence[str] = HEADER, name: str = "manifest.csv") -> Path:
        return write_csv(tmp_path / name, rows, header)

    return make
