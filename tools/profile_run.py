"""`make profile`: where one registration's time goes inside real Kamailio.

N phones register one after the other (REGISTER, 401 with Security-Server, the phone's own
SAs, protected REGISTER, 200 OK) through Kamailio running this project's script under
cProfile (tools/profile_kemi.py). Prints the time the Python callbacks took per registration,
by callback, and the functions that took it (own time and cumulative), summed over every
Kamailio process. Run where the kernel has ESP (User-mode Linux otherwise, like the tests).

    tools/with-esp .venv/bin/python -m tools.profile_run [N] [--plain | --times]

Also prints the CPU time (user + system) all Kamailio processes used per registration, from
/proc: with --plain, the script runs without the profiler, and that figure is the real cost;
with --times, the callbacks are timed but not profiled (the Python share of that cost).
"""
from __future__ import annotations

import glob
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests" / "kernel")]

import esp_net  # noqa: E402
from pcscf_net import Kamailio, Phone, Scscf  # noqa: E402

WARM_UP = 5


def main(n: int, plain: bool, times_only: bool) -> None:
    link = esp_net.make_link("prof")
    scscf = Scscf(link)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "prof"
        out.mkdir()
        script = {} if plain else {"KEMI_SCRIPT": f'"{ROOT / "tools" / "profile_kemi.py"}"',
                                   "PROFILE_DIR": f'"{out}"'}
        if times_only:
            script["PROFILE_TIMES_ONLY"] = "1"
        k = Kamailio(link, Path(d) / "run", **script)
        k.start()
        try:
            for i in range(WARM_UP):
                Phone(link, scscf, user=f"warm{i}").full_registration()
            time.sleep(1.2)  # the sweep dumps its profile; workers dump every 50 calls
            before, cpu0 = _busy(out), kamailio_cpu()
            t0 = time.monotonic()
            for i in range(n):
                Phone(link, scscf, user=f"p{i}").full_registration()
            wall = time.monotonic() - t0
            cpu = kamailio_cpu() - cpu0
            print(f"{n} registrations in {wall:.2f} s ({n / wall:.1f}/s, {1000 * wall / n:.1f} ms "
                  f"each, the phone's own `ip xfrm` included); Kamailio used "
                  f"{1000 * cpu / n:.2f} ms CPU per registration (all processes, /proc)")
            if not plain:
                time.sleep(1.2)
                _report(out, n, before, times_only)
        finally:
            k.stop()
            scscf.close()
            esp_net.drop_link(link)


def _busy(out: Path) -> dict[str, tuple[int, float, float]]:
    got = {}
    for path in glob.glob(str(out / "*.busy")):
        calls, busy, cpu = open(path).readline().split()
        got[path] = (int(calls), float(busy), float(cpu))
    return got


def kamailio_cpu() -> float:
    """CPU seconds (user + system) used so far by every running kamailio process."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
        if name == "kamailio":
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _report(out: Path, n: int, before: dict, times_only: bool) -> None:
    after = _busy(out)
    calls, busy, cpu = (sum(v[i] for v in after.values()) - sum(v[i] for v in before.values())
                        for i in range(3))
    print(f"Python callbacks (profiled; each worker writes every 50 calls): {calls} calls, "
          f"{1000 * cpu / max(n, 1):.2f} ms CPU ({1000 * busy / max(n, 1):.2f} ms wall) "
          "per registration" + ("" if times_only else ", profiler overhead included"))
    if times_only:
        return
    files = [p for p in glob.glob(str(out / "*.prof"))]
    stats = pstats.Stats(*files, stream=(buf := io.StringIO()))
    stats.strip_dirs()
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative")):
        buf.seek(0)
        buf.truncate()
        stats.sort_stats(key).print_stats(30)
        print(f"\n== by {title}, CPU seconds (all processes, warm-up included) ==")
        print("\n".join(line for line in buf.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 100, "--plain" in sys.argv, "--times" in sys.argv)
