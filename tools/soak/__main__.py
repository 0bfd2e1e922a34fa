"""`make soak`: cycles of register / re-key / MO+MT MESSAGE / de-register-or-expire over many
phones through this P-CSCF with real ESP, then: nothing leaked, memory flat.

    tools/with-esp .venv/bin/python -m tools.soak [--phones N] [--cycles C] ...

Options also come from SOAK_ARGS (how `make soak` passes them into User-mode Linux).
Exits 1 on any failed step, leak or memory growth past the threshold, 2 when the rig failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ipsec.algorithms import is_valid_pair
from ipsec.xfrm import Xfrm

from tools.load.__main__ import make_phones, make_stub, pcscf_defines, raise_fd_limit
from tools.load.engine import Engine
from tools.load.kamailio import Kamailio
from tools.load.net import MAX_PHONES, drop_link, make_link
from tools.load.report import keep_run_dir, say

from . import memory
from .phone import SoakPhone

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "kernel"))
import invariant  # noqa: E402  (tests/kernel/invariant.py: the store-vs-kernel check)

SWEEP_MARGIN = 2.5  # seconds past expiry + grace by which the 1 s sweep has surely run


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--phones", "-n", type=int, default=200, help="phones (default 200)")
    ap.add_argument("--cycles", "-c", type=int, default=10000,
                    help="cycles in all, over every phone (default 10000)")
    ap.add_argument("--in-flight", "-k", type=int, default=20,
                    help="phones with a step in progress at once (default 20)")
    ap.add_argument("--expire-every", type=int, default=5,
                    help="every Nth cycle of a phone ends by expiry, not de-registration "
                         "(default 5; 0: never)")
    ap.add_argument("--expires", type=int, default=300,
                    help="Expires of a cycle that de-registers (default 300)")
    ap.add_argument("--short-expires", type=int, default=5,
                    help="Expires of a cycle that expires (default 5)")
    ap.add_argument("--grace", type=int, default=2, help="EXPIRY_GRACE (default 2)")
    ap.add_argument("--threshold", type=float, default=5.0,
                    help="memory growth, last half vs first half, that still counts as flat, "
                         "in %% (default 5)")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds the final checks wait for the sweep (default 30)")
    ap.add_argument("--children", type=int, default=2, help="CHILDREN (default 2)")
    ap.add_argument("--max-connections", type=int, default=10,
                    help="IPSEC_MAX_CONNECTIONS (default 10)")
    ap.add_argument("--alg", default="hmac-sha-1-96")
    ap.add_argument("--ealg", default="aes-cbc")
    ap.add_argument("--timeout", type=float, default=32.0,
                    help="seconds a transaction may take (default 32)")
    ap.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE",
                    help="more kamailio.cfg defines (repeatable)")
    ap.add_argument("--keep", metavar="DIR", help="copy the run dir to DIR (absolute)")
    opts = ap.parse_args(argv)
    if not 1 <= opts.phones <= MAX_PHONES or opts.in_flight < 1 or opts.cycles < 1:
        ap.error(f"--phones: 1..{MAX_PHONES}; --in-flight, --cycles: at least 1")
    if not is_valid_pair(opts.alg, opts.ealg):
        ap.error(f"not a valid alg/ealg pair: {opts.alg}/{opts.ealg}")
    if opts.keep and not os.path.isabs(opts.keep):
        ap.error("--keep needs an absolute path")
    opts.define = [f"EXPIRY_GRACE={opts.grace}"] + opts.define
    return opts


STEPS = [  # (name, what each phone does, timed)
    ("401 step", SoakPhone.start_challenge, True),
    ("phones' SAs", SoakPhone.start_install, False),
    ("protected REGISTER", SoakPhone.start_authenticate, True),
    ("re-key", SoakPhone.start_rekey, True),
    ("MO MESSAGE", SoakPhone.start_mo, True),
    ("MT MESSAGE", SoakPhone.start_mt, True),
    ("de-register / expire", SoakPhone.start_end, True),
]


class Totals:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.retransmits = 0
        self.dereg = self.expired = 0


def run_cycles(opts, engine: Engine, phones: list[SoakPhone], pcscf: Kamailio,
               totals: Totals, samples: list[memory.Sample],
               maps_first: dict[int, dict[str, int]]) -> str:
    """Rounds until `opts.cycles` cycles were started: every phone free to start one (not
    failed, not waiting for its last registration to expire) goes through every step.
    Returns the memory kind sampled (PSS or RSS)."""
    kind, first = memory.sample(0, pcscf.processes(), shm_used_kb(pcscf))
    samples.append(first)
    started, next_report = 0, 1000
    while started < opts.cycles:
        now = time.monotonic()
        ready = [p for p in phones if p.failed is None and p.not_before <= now]
        ready = ready[:opts.cycles - started]
        if not ready:
            if not any(p.failed is None for p in phones):
                break
            pcscf.check_alive()
            time.sleep(0.2)
            continue
        for p in ready:
            every = opts.expire_every
            expiring = every > 0 and (p.cycles + p.idx) % every == every - 1
            p.new_cycle(opts.short_expires if expiring else opts.expires, expiring)
        started += len(ready)
        for name, start, timed in STEPS:
            alive = [p for p in ready if p.failed is None]
            k = opts.in_flight if timed else max(1, len(alive))
            result = engine.run_phase(name, alive, start, k, timed)
            totals.ok[name] += result.ok
            totals.failures.update(result.failures)
            totals.notes.update(result.notes)
            totals.retransmits += result.retransmits
        end = time.monotonic()
        for p in ready:
            if p.failed is None:
                if p.expiring:
                    totals.expired += 1
                    p.not_before = end + opts.short_expires + opts.grace + SWEEP_MARGIN
                else:
                    totals.dereg += 1
        done = totals.dereg + totals.expired
        kind, s = memory.sample(done, pcscf.processes(), shm_used_kb(pcscf))
        samples.append(s)
        if not maps_first:
            maps_first.update({pid: memory.mappings_kb(pid) for pid in s.per_process})
            for pid, kb in memory.parse_pkg_stats(kamcmd(pcscf, "pkg.stats")).items():
                maps_first.setdefault(pid, {})["pkg in use"] = kb
        if done >= next_report or started >= opts.cycles:
            while next_report <= done:
                next_report += 1000
            say(f"{done} cycles done ({totals.dereg} de-registered, {totals.expired} expired), "
                f"{sum(totals.failures.values())} failed; Kamailio {kind} {s.total} KB in "
                f"{len(s.per_process)} processes, largest {s.largest} KB")
    return kind


def kamcmd(k: Kamailio, command: str) -> str:
    """One command over the P-CSCF's ctl socket; '' when it does not answer."""
    try:
        return subprocess.run(["kamcmd", "-s", f"unix:{k.run_dir}/kamailio_ctl", command],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def shm_used_kb(k: Kamailio) -> int:
    """Kamailio's own account of its shared memory pool in use (`kamcmd core.shmmem`,
    real_used: with the allocator's overhead), 0 when ctl does not answer."""
    out = kamcmd(k, "core.shmmem")
    m = re.search(r"real_used:\s*(\d+)", out)
    return int(m.group(1)) // 1024 if m else 0


def print_growth(grown, roles: dict[int, str], maps_first: dict[int, dict[str, int]],
                 maps_last: dict[int, dict[str, int]]) -> None:
    """The processes that grew most, with their role and where in their memory it went."""
    if not grown:
        return
    print("\nprocesses that grew most (KB: after the first round, mid-run, at the end; "
          "Pss by mapping first -> last):")
    for pid, first, mid, last in grown:
        a, b = maps_first.get(pid, {}), maps_last.get(pid, {})
        parts = ", ".join(f"{k} {a.get(k, 0)} -> {b.get(k, 0)}"
                          for k in sorted(set(a) | set(b))
                          if a.get(k, 0) != b.get(k, 0) or k in ("pkg in use", "RSS"))
        print(f"  pid {pid} ({roles.get(pid, '?')}): {first} -> {mid} -> {last} ({last - first:+d}); "
              f"{parts or 'no mapping changed'}")


def store_files_kb(path: Path) -> str:
    """Sizes of the store's files: the WAL must not grow with the run (Store.checkpoint)."""
    sizes = []
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        sizes.append(f"{f.name} {f.stat().st_size // 1024 if f.exists() else 0} KB")
    return ", ".join(sizes)


def store_counts(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        one = lambda q: db.execute(q).fetchone()[0]  # noqa: E731
        return {"contacts": one("SELECT count(*) FROM contacts"),
                "tunnels (leases)": one("SELECT count(*) FROM tunnels"),
                "de-registration notes": one("SELECT count(*) FROM meta WHERE key LIKE 'dereg:%'")}
    finally:
        db.close()


def final_checks(opts, link, store: Path, phones: list[SoakPhone]) -> list[str]:
    """After the last cycle and the last expiry + grace + sweep: the invariant (store vs
    kernel, leases) holds, and every count is 0. Looked at until true or `settle` passed."""
    wait = max((p.not_before for p in phones), default=0) - time.monotonic()
    if wait > 0:
        say(f"waiting {wait:.0f} s for the last short registrations to expire and be swept")
        time.sleep(wait)
    deadline = time.monotonic() + opts.settle
    while True:
        found = invariant.problems(link.pc, store)
        counts = store_counts(store)
        counts["SAs (P-CSCF kernel)"] = len(invariant.kernel_sas(link.pc))
        counts["policies (P-CSCF kernel)"] = len(invariant.kernel_policies(link.pc))
        counts["phones' own SAs"] = len(invariant.kernel_sas(link.ue))
        counts["phones' own policies"] = len(invariant.kernel_policies(link.ue))
        leaks = found + [f"{n} {what} left" for what, n in counts.items() if n]
        if not leaks or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    say("after the run: " + ", ".join(f"{what} {n}" for what, n in counts.items())
        + f"; invariant (tests/kernel/invariant.py): "
        + ("holds" if not found else f"{len(found)} problems"))
    return leaks


def log_errors(k: Kamailio) -> list[str]:
    if not k.log_path.exists():
        return []
    return [line for line in k.log_path.read_text(errors="replace").splitlines()
            if " ERROR:" in line or " CRITICAL:" in line or " BUG:" in line]


def main(argv: list[str]) -> int:
    opts = parse(shlex.split(os.environ.get("SOAK_ARGS", "")) + argv)
    raise_fd_limit(4 * opts.phones + 1024)
    run_dir = Path(tempfile.mkdtemp(prefix="soak-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    say(f"make soak: {opts.cycles} cycles over {opts.phones} phones, {opts.in_flight} in flight, "
        f"every {opts.expire_every}th cycle expires (Expires {opts.short_expires}, "
        f"EXPIRY_GRACE {opts.grace}), the others de-register (Expires {opts.expires}), "
        f"CHILDREN={opts.children}, IPSEC_MAX_CONNECTIONS={opts.max_connections}")
    t0 = time.monotonic()
    link = make_link(f"soak{os.getpid()}", opts.phones)
    xfrm = Xfrm(netns=link.ue)
    engine = Engine(link.pcscf, opts.timeout, xfrm)
    totals, samples = Totals(), []
    pcscf: Kamailio | None = None
    phones: list[SoakPhone] = []
    broken, leaks, errors, kind, run_time = "", [], [], "PSS", 0.0
    roles: dict[int, str] = {}
    maps_first: dict[int, dict[str, int]] = {}
    grown, maps_last = [], {}
    files = ""
    try:
        phones = make_phones(engine, link, (opts.alg, opts.ealg), SoakPhone)
        make_stub(engine, link)
        pcscf = Kamailio(link.pc, link.pcscf, ROOT / "kamailio.cfg", run_dir, "pcscf",
                         pcscf_defines(opts, link.pcscf, run_dir))
        took = pcscf.start()
        engine.watchdog = pcscf.check_alive
        say(f"P-CSCF up: {len(pcscf.processes())} processes, {took:.1f} s")
        t_run = time.monotonic()
        roles = memory.parse_psx(kamcmd(pcscf, "core.psx"))
        kind = run_cycles(opts, engine, phones, pcscf, totals, samples, maps_first)
        run_time = time.monotonic() - t_run
        grown = memory.growth_by_process(samples)[:3]
        maps_last = {pid: memory.mappings_kb(pid) for pid, *_ in grown}
        for pid, kb in memory.parse_pkg_stats(kamcmd(pcscf, "pkg.stats")).items():
            if pid in maps_last:
                maps_last[pid]["pkg in use"] = kb
        leaks = final_checks(opts, link, run_dir / "ipsec-pcscf.sqlite", phones)
        files = store_files_kb(run_dir / "ipsec-pcscf.sqlite")
        pcscf.check_alive()
    except RuntimeError as e:
        broken = str(e)
        say(f"soak: the rig failed: {e}")
    finally:
        if pcscf is not None and pcscf.proc is not None:
            pcscf.stop()
            errors = log_errors(pcscf)
        engine.close()
        xfrm.close()
        for p in phones:
            for s in p.socks.values():
                s.close()
        drop_link(link)
    done = totals.dereg + totals.expired
    print(f"\ncycles: {done} of {opts.cycles} ({totals.dereg} de-registered, {totals.expired} "
          f"expired) in {run_time:.0f} s, {done / run_time if run_time else 0:.1f} cycles/s; "
          f"retransmissions {totals.retransmits}")
    print("steps ok: " + ", ".join(f"{n} {c}" for n, c in totals.ok.items()))
    for cause, n in totals.failures.most_common():
        print(f"  FAILED {n}x: {cause}")
    for note, n in totals.notes.most_common(10):
        print(f"  note {n}x: {note}")
    print(f"\nKamailio memory ({kind} per process, sampled after every round):\n")
    print(memory.table(memory.curve(samples, 1000), kind))
    print_growth(grown, roles, maps_first, maps_last)
    verdict = memory.flatness(samples, opts.threshold)
    print(f"\nmemory: {'FLAT' if verdict.flat else 'NOT FLAT'}: {verdict.why}")
    print(f"store files at the end: {files}")
    print(f"leaks: {'none' if not leaks else len(leaks)}")
    for line in leaks[:40]:
        print(f"  LEAK: {line}")
    print(f"Kamailio log: {len(errors)} ERROR/CRITICAL/BUG lines")
    for line in errors[:10]:
        print(f"  {line}")
    if opts.keep:
        keep_run_dir(run_dir, Path(opts.keep))
    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"soak: done in {time.monotonic() - t0:.0f} s")
    if broken:
        return 2
    failed = bool(totals.failures) or bool(leaks) or not verdict.flat or done < opts.cycles
    print("soak: " + ("FAILED" if failed else "OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
