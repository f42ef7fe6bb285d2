"""The side-by-side statistics of benchmarks/bench_cpu_suite.py: the round-by-round ratio, over all rounds
and over the rounds a probe found the two vCPUs on cores of their own, and the probe itself."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_cpu_suite import CORES_APART, CoreProbe, split_by_cores  # noqa: E402
from bench_resnet18 import paired_ratio  # noqa: E402

ORT = {"round_medians_ms": [2.0, 4.0, 2.0, 4.0, 2.0]}
OURS = {"round_medians_ms": [1.4, 3.2, 1.3, 3.0, 1.5]}  # per round 0.7, 0.8, 0.65, 0.75, 0.75


def test_paired_ratio_is_the_median_of_per_round_ratios_over_the_rounds_asked_for():
    assert paired_ratio(OURS, ORT) == 0.75
    assert paired_ratio(OURS, ORT, [0, 2]) == pytest.approx(0.675)
    assert paired_ratio(OURS, ORT, [1]) == 0.8
    assert paired_ratio(OURS, ORT, []) is None
    assert paired_ratio(OURS, {"round_medians_ms": [2.0]}) is None  # rounds that do not pair up


def test_rounds_are_split_by_whether_the_probe_found_the_cores_apart():
    res = {"ort_int8": ORT, "intforge_int8": OURS}
    split = split_by_cores(res, [1.98, 1.2, 1.95, 1.1, CORES_APART])
    assert split == {"cores_apart_at_or_above": CORES_APART, "rounds_apart": 3, "rounds_shared": 2,
                     "paired_ratio_apart": 0.7, "paired_ratio_shared": 0.775}
    assert split_by_cores(res, [2.0, 2.0, 2.0, 2.0, 2.0])["paired_ratio_shared"] is None
    assert split_by_cores(res, [2.0, None, 2.0, 2.0, 2.0]) is None  # a failed probe: no split at all
    assert split_by_cores({"ort_int8": ORT}, [2.0] * 5) is None


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_core_probe_reads_two_threads_against_one():
    probe = CoreProbe()
    if probe.exe is None:
        pytest.skip("neither vnni_peak.c nor avx2_peak.c builds here")
    probe()
    (reading,) = probe.readings
    assert reading is not None and 0.3 < reading < 2.6  # 2 on two free cores, down to about 1 on one
