"""Kamailio's memory during a soak: per-process samples, the curve, and the flatness verdict.

`read_kb` reads one process (PSS from /proc/PID/smaps_rollup, the process's fair share of
shared pages, so Kamailio's shared memory counts once over all processes; VmRSS from
/proc/PID/status where smaps_rollup is missing). The rest is pure and unit-tested
(tests/unit/test_soak.py).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    cycles: int  # cycles finished when the sample was taken
    per_process: dict[int, int]  # pid -> KB
    anon: int = 0  # KB of the total that is private anonymous memory (Pss_Anon), 0 if unknown
    shm_used: int = 0  # KB of Kamailio's shared memory pool in use (kamcmd core.shmmem), 0 if unknown

    @property
    def total(self) -> int:
        return sum(self.per_process.values())

    @property
    def largest(self) -> int:
        return max(self.per_process.values(), default=0)


def read_kb(pid: int) -> tuple[str, int] | None:
    """('PSS', KB) or ('RSS', KB) of one process, None when it is gone."""
    for path, key, kind in ((f"/proc/{pid}/smaps_rollup", "Pss:", "PSS"),
                            (f"/proc/{pid}/status", "VmRSS:", "RSS")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return kind, int(line.split()[1])
        except OSError:
            continue
    return None


def read_anon_kb(pid: int) -> int:
    """Pss_Anon of one process (private heap: Python objects, pkg memory), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(cycles: int, pids: list[int], shm_used: int = 0) -> tuple[str, Sample]:
    per, kinds, anon = {}, set(), 0
    for pid in pids:
        got = read_kb(pid)
        if got is not None:
            kinds.add(got[0])
            per[pid] = got[1]
            anon += read_anon_kb(pid)
    return "/".join(sorted(kinds)) or "none", Sample(cycles, per, anon, shm_used)


def curve(samples: list[Sample], every: int) -> list[Sample]:
    """The first sample at or past each multiple of `every` cycles (and the first and last
    samples), for the printed table."""
    if not samples:
        return []
    out, mark = [samples[0]], every
    for s in samples[1:]:
        if s.cycles >= mark:
            out.append(s)
            while mark <= s.cycles:
                mark += every
    if out[-1] is not samples[-1]:
        out.append(samples[-1])
    return out


@dataclass(frozen=True)
class Verdict:
    flat: bool
    first_kb: float  # median total of the first half
    last_kb: float  # median total of the last half
    growth_pct: float  # of the total
    largest_growth_pct: float  # of the largest process
    why: str


def flatness(samples: list[Sample], threshold_pct: float) -> Verdict:
    """Flat when the median total (and the median largest process) of the second half of the
    run's samples is at most `threshold_pct` % above that of the first half. Samples taken
    before the first cycle finished are left out (a process's pages are touched on first use),
    as are samples where the process count changed from the first one's (a worker died or
    restarted: not a memory curve)."""
    run = [s for s in samples if s.cycles > 0]
    if len(run) < 4:
        return Verdict(False, 0, 0, 0, 0, f"too few samples ({len(run)}) to judge")
    count = len(run[0].per_process)
    changed = [s.cycles for s in run if len(s.per_process) != count]
    if changed:
        return Verdict(False, 0, 0, 0, 0,
                       f"process count changed (at {changed[0]} cycles): not one curve")
    half = len(run) // 2
    first, last = run[:half], run[len(run) - half:]
    f_tot = statistics.median(s.total for s in first)
    l_tot = statistics.median(s.total for s in last)
    f_big = statistics.median(s.largest for s in first)
    l_big = statistics.median(s.largest for s in last)
    growth = 100.0 * (l_tot - f_tot) / f_tot if f_tot else 0.0
    big = 100.0 * (l_big - f_big) / f_big if f_big else 0.0
    flat = growth <= threshold_pct and big <= threshold_pct
    why = (f"total {f_tot:.0f} -> {l_tot:.0f} KB ({growth:+.1f} %), largest process "
           f"{f_big:.0f} -> {l_big:.0f} KB ({big:+.1f} %), threshold {threshold_pct:g} %")
    return Verdict(flat, f_tot, l_tot, growth, big, why)


def table(samples: list[Sample], kind: str) -> str:
    lines = [f"| cycles done | Kamailio processes | total {kind} KB | of which anonymous KB "
             f"| largest process KB | shm pool in use KB |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s.cycles} | {len(s.per_process)} | {s.total} | {s.anon} | {s.largest} "
              f"| {s.shm_used} |" for s in samples]
    return "\n".join(lines)


def _by_pid(text: str, pid_key: str, value_key: str) -> dict[int, str]:
    """pid -> the text of `value_key` in each block of a kamcmd listing (`key: value` lines,
    the pid's line before the value's)."""
    out, pid = {}, None
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == pid_key:
            pid = int(value) if value.strip().isdigit() else None
        elif key == value_key and pid is not None:
            out[pid] = value.strip()
            pid = None
    return out


def parse_psx(text: str) -> dict[int, str]:
    """pid -> role from `kamcmd core.psx` (blocks of IDX/PID/DSC lines)."""
    return _by_pid(text, "PID", "DSC")


def growth_by_process(samples: list[Sample]) -> list[tuple[int, int, int, int]]:
    """(pid, KB at the first sample after cycles began, KB at the middle one, KB at the last),
    the process that grew most first: which process a curve's growth is in."""
    run = [s for s in samples if s.cycles > 0]
    if not run:
        return []
    first, mid, last = run[0], run[len(run) // 2], run[-1]
    rows = [(pid, first.per_process[pid], mid.per_process.get(pid, 0), kb)
            for pid, kb in last.per_process.items() if pid in first.per_process]
    return sorted(rows, key=lambda r: r[1] - r[3])


def mappings_kb(pid: int) -> dict[str, int]:
    """Pss per mapping kind of one process from /proc/PID/smaps: '[heap]' (malloc's brk area:
    small allocations, SQLite's page cache, Kamailio's pkg pool when it uses the system
    malloc), 'anon' (anonymous mmaps: Python's arenas, large mallocs), 'shm' (Kamailio's
    shared pool), 'files' (code and libraries); and 'RSS', the pages the process maps at
    all, shared or not: RSS level while PSS grows is shared pages being copied (a child
    writing into what it inherited), not new memory."""
    out: dict[str, int] = {}
    kind = "files"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    name = head[5] if len(head) > 5 else ""
                    if name == "[heap]":
                        kind = "[heap]"
                    elif not name:
                        kind = "anon"
                    elif name.startswith("/dev/zero") or name.startswith("/SYSV") \
                            or "(deleted)" in line:
                        kind = "shm"
                    elif name.startswith("["):
                        kind = name
                    else:
                        kind = "files"
                elif head[0] == "Pss:":
                    out[kind] = out.get(kind, 0) + int(head[1])
                elif head[0] == "Rss:":
                    out["RSS"] = out.get("RSS", 0) + int(head[1])
    except OSError:
        pass
    return out


def parse_pkg_stats(text: str) -> dict[int, int]:
    """pid -> KB of Kamailio's private (pkg) pool in use, from `kamcmd pkg.stats`."""
    return {pid: int(v) // 1024 for pid, v in _by_pid(text, "pid", "real_used").items()
            if v.isdigit()}
