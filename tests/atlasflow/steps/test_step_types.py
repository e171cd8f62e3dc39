"""The ingest steps' status words and skip reasons: enums whose values are what XCom and the records carry."""

from __future__ import annotations

import json

import pytest

from atlasflow.core.runlog import StageStatus
from atlasflow.steps import ingest as P


def test_step_status_values():
    assert {s.value for s in P.StepStatus} == {"ok", "skipped", "quarantined", "failed"}
    # a step's status becomes its stage record's status: every step word is a record word
    assert {s.value for s in P.StepStatus} <= {s.value for s in StageStatus}


def test_skip_reasons_are_the_strings_xcom_has_always_carried():
    assert P.trained_skip("batch_0003") == "batch_0003 already trained"
    assert P.SkipReason.ALREADY_PROCESSED == "already processed"
    assert P.SkipReason.ALREADY_QUANTIFIED == "already quantified"
    assert P._done_before("batch_0003", "batch_0003 already trained")
    assert P._done_before("batch_0003", "already quantified") and not P._done_before("batch_0003", None)


def test_enum_values_serialise_as_plain_strings():
    result = {"dataset_id": "GSE1", "status": P.StepStatus.OK, "skipped": P.SkipReason.ALREADY_PROCESSED}
    assert json.dumps(result) == '{"dataset_id": "GSE1", "status": "ok", "skipped": "already processed"}'
    serde = pytest.importorskip("airflow.sdk.serde")  # what XCom stores: the enum's value, not the enum
    stored = serde.serialize(result)
    assert stored == {"dataset_id": "GSE1", "status": "ok", "skipped": "already processed"}
    assert all(type(v) is str for v in stored.values())
