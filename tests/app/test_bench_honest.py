"""`fastdiff bench` reports honest numbers (issue 22, item 4): interleaved rounds, disturbed rounds dropped, a ratio
only where it settled ("noisy" otherwise), the load and thread count printed, GB/s and images/s in separate tables."""
from __future__ import annotations

import re
import time

import pytest
import torch

from fastdiff.app import benchtable
from fastdiff.app.benchtable import Timing, interleave

CPU = torch.device("cpu")


def _spin(seconds: float) -> None:
    """Busy-wait on the CPU (CPU time ≈ wall time when the process is not descheduled)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_rounds_where_a_call_was_descheduled_are_dropped():
    # "b" sleeps in every other call: its wall time then doubles while its CPU time does not, exactly what being
    # descheduled by another job looks like; those rounds must not enter the medians or the ratios
    calls = {"n": 0}

    def disturbed():
        calls["n"] += 1
        _spin(0.002)
        if calls["n"] % 2 == 0:
            time.sleep(0.004)

    t = interleave({"ref": lambda: _spin(0.002), "b": disturbed}, CPU, min_rounds=12, max_rounds=12, budget_s=60,
                   threads=1)
    assert t.rounds == 12
    slept = range(0, 12, 2)  # call 1 is the warm-up: the calls of rounds 0, 2, 4, ... are even and sleep
    clean = t.clean_rounds()
    for i in slept:
        assert t.wall[i] not in clean, f"round {i} (b slept 4 ms) was kept"
    assert all(w["b"] < 0.004 for w in clean)


def test_ratio_of_a_run_that_did_not_settle_is_printed_as_noisy_never_as_a_ratio():
    t = Timing(["reference", "cpp"], cpu=False)
    for ref, b in [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (1.0, 1.0), (3.0, 1.0), (1.5, 1.0)]:
        t.wall.append({"reference": ref, "cpp": b})
    cell = benchtable._ratio_cell(t, "cpp", 3)
    assert cell.startswith("noisy (±") and "×" not in cell


def test_too_few_clean_rounds_are_noisy_whatever_the_spread():
    t = Timing(["reference", "cpp"], cpu=True, threads=1)
    for sh in (1.0, 1.0, 0.2, 0.2, 0.2):  # three rounds descheduled: two clean ones left
        t.wall.append({"reference": 2.0, "cpp": 1.0})
        t.share.append({"reference": 1.0, "cpp": sh})
    assert t.clean == 2
    assert benchtable._ratio_cell(t, "cpp", 3) == "noisy (2 clean rounds)"


def test_one_thread_that_never_got_its_core_has_no_clean_round():
    # a steady load that halves every call's CPU share: relative to itself every round looks alike, but with one
    # thread the baseline is the whole core, so none is clean and no ratio is printed
    t = Timing(["reference", "cpp"], cpu=True, threads=1)
    for _ in range(6):
        t.wall.append({"reference": 2.0, "cpp": 1.0})
        t.share.append({"reference": 0.5, "cpp": 0.5})
    assert t.clean == 0 and benchtable._ratio_cell(t, "cpp", 3) == "noisy (0 clean rounds)"
    assert benchtable._ms_cell(t, "reference") == "~2000.000 (disturbed)"  # a time, marked; never a ratio
    assert benchtable._rate_cell(t, "cpp", lambda s: 64 / s, ".0f") == "~64"
    t.threads = 2  # two threads: an op may use one of them, so the baseline is the best share seen
    assert t.clean == 6


def test_settled_ratio_is_the_median_of_per_round_ratios_with_its_spread():
    t = Timing(["reference", "cpp"], cpu=False)
    for ref in (2.0, 2.02, 1.98, 2.0, 2.01):
        t.wall.append({"reference": ref, "cpp": 1.0})
    assert benchtable._ratio_cell(t, "cpp", 3) == "2.00× ±0%"
    assert t.stable(3)


def test_interleave_stops_once_stable_and_runs_every_callable_each_round():
    n = {"a": 0, "b": 0}

    def a():
        n["a"] += 1

    def b():
        n["b"] += 1

    t = interleave({"a": a, "b": b}, CPU, min_rounds=5, max_rounds=500, budget_s=30, threads=1)
    assert n["a"] == n["b"] == t.rounds + 1  # one warm-up call each, then one per round
    assert t.rounds <= 500


def test_busy_cpu_drops_to_one_thread_unless_threads_is_given(monkeypatch):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(benchtable, "load_average", lambda: 9.0)
        monkeypatch.setattr(benchtable.os, "cpu_count", lambda: 2)
        n, why = benchtable.choose_threads(CPU, None)
        assert n == 1 == torch.get_num_threads() and "busy (load 9.0 on 2 cores)" in why
        torch.set_num_threads(2)
        n, why = benchtable.choose_threads(CPU, 2)
        assert n == 2 == torch.get_num_threads() and why == "--threads"
        monkeypatch.setattr(benchtable, "load_average", lambda: 0.5)
        assert benchtable.choose_threads(CPU, None) == (2, "torch's default")
    finally:
        torch.set_num_threads(old)


def test_cli_bench_passes_threads_and_repeat(monkeypatch):
    from fastdiff.app import cli

    seen = {}
    monkeypatch.setattr(benchtable, "run", lambda **kw: seen.update(kw) or 0)
    assert cli.main(["bench", "--device", "cpu", "--threads", "1", "--repeat", "7"]) == 0
    assert seen["threads"] == 1 and seen["repeat"] == 7


def test_bench_prints_load_and_threads_and_keeps_units_apart():
    old = torch.get_num_threads()
    lines: list[str] = []
    try:
        assert benchtable.run(CPU, repeat=3, quick=True, out=lines.append, threads=1, budget_s=0.5) == 0
    finally:
        torch.set_num_threads(old)
    text = "\n".join(lines)
    assert re.search(r"^threads: 1 \(--threads\); load: (\d+\.\d\d on \d+ cores at the start|unknown)", text, re.M)
    heads = [i for i, ln in enumerate(lines) if ln.startswith(("op ", "loop "))]
    assert len(heads) == 2, text
    op_head, loop_head = lines[heads[0]], lines[heads[1]]
    assert "GB/s" in op_head and "images/s" not in op_head and "img/s" not in op_head
    assert "images/s" in loop_head and "GB/s" not in loop_head
    # every ratio cell: "1" (the reference), a settled ratio with its spread, or "noisy (...)"
    for ln in lines[heads[0] + 2:]:
        if not ln.strip():
            break
        cell = re.split(r"\s{2,}", ln.strip())[-1]
        assert cell == "1" or re.fullmatch(r"\d+\.\d\d× ±\d+%", cell) or cell.startswith(("noisy (", "failed:")), ln
    assert "DDIM 5 steps, bundled UNet2D" in text
    assert re.search(r"ops: \d+ clean of \d+ interleaved rounds", text)


@pytest.mark.parametrize("values, want", [([1.0, 1.0, 1.0], 0.0), ([1.0, 2.0], None)])
def test_spread_is_half_the_iqr_over_the_median(values, want):
    assert Timing.spread(values) == want
