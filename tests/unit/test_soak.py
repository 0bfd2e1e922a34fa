"""The soak's pure logic (tools/soak/memory.py): the flatness verdict, the printed curve, and
reading a process's memory."""
from __future__ import annotations

import os

from tools.soak.memory import (Sample, curve, flatness, growth_by_process, mappings_kb,
                               parse_pkg_stats,
                               parse_psx, read_kb, table)


def run(totals: list[int], procs: int = 4, step: int = 200) -> list[Sample]:
    """A sample before any cycle, then one per round; each total spread over `procs`."""
    out = [Sample(0, {pid: 100 for pid in range(procs)})]
    for i, total in enumerate(totals, 1):
        per = {pid: total // procs for pid in range(procs)}
        out.append(Sample(i * step, per))
    return out


def test_a_constant_curve_is_flat():
    v = flatness(run([4000] * 20), 5.0)
    assert v.flat and v.growth_pct == 0 and v.largest_growth_pct == 0


def test_the_warm_up_before_the_first_cycle_is_not_growth():
    # the cycles-0 sample (100 KB per process) is far below the rest: not counted
    assert flatness(run([4000] * 10), 5.0).flat


def test_steady_growth_is_not_flat():
    v = flatness(run([4000 + 40 * i for i in range(20)]), 5.0)
    assert not v.flat and v.growth_pct > 5.0
    assert "threshold 5 %" in v.why


def test_noise_under_the_threshold_is_flat():
    totals = [4000, 4100, 3950, 4080, 4010, 3990, 4120, 4030, 3970, 4060]
    assert flatness(run(totals), 5.0).flat


def test_the_largest_process_is_judged_apart_from_the_total():
    # a small process growing while a larger one gives back as much: the total and the
    # largest are both flat (the verdict judges those two); a growing largest is caught
    samples = [Sample(i * 100, {1: 1000 + 100 * i, 2: 50_000 - 100 * i, 3: 100})
               for i in range(1, 21)]
    v = flatness(samples, 5.0)
    assert abs(v.growth_pct) < 1 and v.largest_growth_pct < 0  # the largest is process 2
    samples = [Sample(i * 100, {1: 1000 + 100 * i, 2: 1000}) for i in range(1, 21)]
    v = flatness(samples, 5.0)
    assert not v.flat and v.largest_growth_pct > 5


def test_too_few_samples_is_no_verdict():
    v = flatness(run([4000] * 3), 5.0)
    assert not v.flat and "too few samples" in v.why


def test_a_changed_process_count_is_not_one_curve():
    samples = run([4000] * 10)
    samples[6] = Sample(samples[6].cycles, {1: 1000, 2: 1000, 3: 1000})
    v = flatness(samples, 5.0)
    assert not v.flat and "process count changed" in v.why


def test_curve_takes_the_first_sample_past_each_mark_and_the_last():
    samples = [Sample(c, {1: c}) for c in (0, 180, 360, 540, 720, 900, 1080, 1260, 2100, 2150)]
    assert [s.cycles for s in curve(samples, 1000)] == [0, 1080, 2100, 2150]
    assert curve([], 1000) == []


def test_table_rows():
    text = table([Sample(1000, {1: 10, 2: 30})], "PSS")
    assert "| 1000 | 2 | 40 | 0 | 30 | 0 |" in text and "total PSS KB" in text


def test_read_kb_of_this_process_and_of_none():
    kind, kb = read_kb(os.getpid())
    assert kind in ("PSS", "RSS") and kb > 0
    assert read_kb(2 ** 22 + 12345) is None


def test_roles_come_from_core_psx():
    text = """{
\tIDX: 0
\tPID: 700
\tDSC: main process - attendant
}
{
\tIDX: 26
\tPID: 880
\tDSC: RTIMER EXEC child=0 timer=ipsec_sweep
}
"""
    assert parse_psx(text) == {700: "main process - attendant",
                               880: "RTIMER EXEC child=0 timer=ipsec_sweep"}
    assert parse_psx("") == {}


def test_the_process_that_grew_most_comes_first():
    samples = [Sample(0, {1: 10, 2: 10, 3: 10}), Sample(100, {1: 100, 2: 100, 3: 100}),
               Sample(200, {1: 100, 2: 150, 3: 120}), Sample(300, {1: 101, 2: 300, 3: 90})]
    rows = growth_by_process(samples)
    assert rows[0] == (2, 100, 150, 300)  # first after cycles began, middle, last
    assert [r[0] for r in rows] == [2, 1, 3]
    assert growth_by_process([]) == []


def test_this_process_has_a_heap_or_anonymous_memory_and_files():
    kinds = mappings_kb(os.getpid())
    assert kinds.get("files", 0) > 0
    assert kinds.get("[heap]", 0) + kinds.get("anon", 0) > 0
    assert mappings_kb(2 ** 30) == {}


def test_pkg_in_use_comes_from_pkg_stats():
    text = "{\n\tentry: 0\n\tpid: 880\n\trank: 4\n\tused: 100\n\tfree: 900\n\treal_used: 204800\n}\n" \
           "{\n\tentry: 1\n\tpid: 881\n\treal_used: oops\n}\n"
    assert parse_pkg_stats(text) == {880: 200}
