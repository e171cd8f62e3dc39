"""Thread counts for compute steps that share the worker's cores."""

from __future__ import annotations

import os

import pytest

from atlasflow.core import cpus


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


def test_usable_cpus_is_the_affinity_mask_not_the_machine(four_cpus):
    assert cpus.usable_cpus() == 4


@pytest.mark.parametrize(("configured", "sharing", "expected"), [
    (None, 1, 4),   # alone: every usable CPU
    (None, 2, 2),   # beside one other process: half
    (None, 3, 1),   # rounded down
    (None, 8, 1),   # never fewer than one thread
    (None, 0, 4),   # a nonsensical share is one process
    (6, 2, 6),      # a configured count wins, even above the CPUs (the user knows their node)
])
def test_threads_for_shares_the_cpus_unless_configured(four_cpus, configured, sharing, expected):
    assert cpus.threads_for(configured, sharing=sharing) == expected
