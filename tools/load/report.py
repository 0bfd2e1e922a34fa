"""What a load run prints: per phase rate and latency, the ratios to the relay, every failure by
cause, the ESP counters, Kamailio's error lines; and the run dir kept for inspection."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .engine import PhaseResult

if TYPE_CHECKING:
    from .kamailio import Kamailio

T0 = time.monotonic()
_DIGITS = re.compile(rb"\d+")


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def two_step(name: str, first: PhaseResult, second: PhaseResult) -> PhaseResult:
    """The full registration: a phone's two latencies added, the two phases' busy times added."""
    both = PhaseResult(name, first.attempted, busy=first.busy + second.busy,
                       wall=first.wall + second.wall, cpu=first.cpu + second.cpu,
                       retransmits=first.retransmits + second.retransmits,
                       notes=first.notes + second.notes)
    both.latencies = {i: first.latencies[i] + lat for i, lat in second.latencies.items()
                      if i in first.latencies}
    return both


class Report:
    def __init__(self) -> None:
        self.phases: list[PhaseResult] = []
        self.two_steps: dict[str, PhaseResult] = {}
        self.relay_rounds: list[tuple[PhaseResult, PhaseResult]] = []  # (401 step, two-step)
        self.esp_lines: list[str] = []
        self.esp_failures: Counter[str] = Counter()
        self.broken = ""

    @property
    def failed(self) -> bool:
        return bool(self.broken or self.esp_failures or any(r.failures for r in self.phases))

    def add(self, result: PhaseResult) -> None:
        self.phases.append(result)

    def two_step(self, label: str, first: PhaseResult, second: PhaseResult,
                 relay_round: bool = False) -> None:
        both = self.two_steps[label] = two_step(f"{label} two-step (401 + 200)", first, second)
        if relay_round:
            self.relay_rounds.append((first, both))

    def ratios(self) -> tuple[dict[str, float], str]:
        """IPsec rate / relay rate for the 401 step and the two-step, each against the relay
        round of median rate; and what the reference was."""
        ipsec = {"401 step": next((r for r in self.phases if r.name == "IPsec 401 step"), None),
                 "two-step": self.two_steps.get("IPsec")}
        out: dict[str, float] = {}
        spans = []
        for i, (label, mine) in enumerate(ipsec.items()):
            rates = sorted(pair[i].rate for pair in self.relay_rounds if pair[i].rate > 0)
            if mine is None or not rates:
                continue
            out[label] = mine.rate / rates[(len(rates) - 1) // 2]
            spans.append(f"{label} {rates[0]:.0f}-{rates[-1]:.0f}/s" if len(rates) > 1
                         else f"{label} {rates[0]:.0f}/s")
        rounds = len(self.relay_rounds)
        what = (f"relay: the median of {rounds} rounds ({', '.join(spans)})" if rounds > 1
                else "relay: one round")
        return out, what

    def esp(self, when: str, counters: dict[tuple[str, int], int], failures: Counter[str]) -> None:
        used = sum(1 for n in counters.values() if n)
        self.esp_lines.append(f"{when}: {len(counters)} SAs on the P-CSCF, {used} carried packets, "
                              f"{sum(counters.values())} packets in all; "
                              f"{sum(failures.values())} phone SAs failed the check")
        self.esp_failures += failures

    def esp_info(self, line: str) -> None:
        self.esp_lines.append(line)

    @staticmethod
    def line(r: PhaseResult) -> str:
        fails = f", {sum(r.failures.values())} failed" if r.failures else ""
        if not r.timed:
            return f"{r.name}: {r.ok}/{r.attempted} in {r.wall:.2f} s{fails}"
        return (f"{r.name}: {r.ok}/{r.attempted} in {r.busy:.2f} s, {r.rate:.1f}/s, "
                f"p50 {r.percentile(0.5) * 1000:.0f} ms, p99 {r.percentile(0.99) * 1000:.0f} ms, "
                f"{r.retransmits} retransmissions, generator CPU {r.cpu_share:.0%}"
                f"{r.server_ms()}{fails}")

    def print(self, kamailios: list[Kamailio], log_dir: Path | None) -> None:
        """Everything, Kamailio's logs named in `log_dir` (where they were kept) if given."""
        rows = [r for r in self.phases if r.timed] + list(self.two_steps.values())
        print(f"\n{'phase':<38} {'ok/tried':>11} {'busy s':>8} {'rate/s':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'retx':>6} {'stray':>6} {'gen CPU':>8}")
        for r in rows:
            print(f"{r.name:<38} {f'{r.ok}/{r.attempted}':>11} {r.busy:8.2f} {r.rate:8.1f} "
                  f"{r.percentile(0.5) * 1000:8.0f} {r.percentile(0.99) * 1000:8.0f} "
                  f"{r.retransmits:6} {r.strays:6} {r.cpu_share:8.0%}")
        self._print_ratios()
        print("\nESP counters (ip -s xfrm state in the P-CSCF namespace):")
        for line in self.esp_lines or ["not read: the run stopped before"]:
            print(f"  {line}")
        self._print_failures()
        self._print_notes()
        for k in kamailios:
            self._print_log(k, log_dir)

    def _print_ratios(self) -> None:
        found, what = self.ratios()
        if found:
            print("\nIPsec / relay rate: "
                  + ", ".join(f"{label} {ratio:.2f}" for label, ratio in found.items())
                  + f" ({what})")

    def _print_failures(self) -> None:
        total = Counter()
        for r in self.phases:
            total += r.failures
        total += self.esp_failures
        if self.broken:
            print(f"\nRIG FAILED: {self.broken}")
        if not total:
            print("\nfailures: none")
            return
        print(f"\nfailures by cause ({sum(total.values())}):")
        for r in self.phases:
            for cause, n in r.failures.most_common():
                print(f"  {n:6}  {r.name.split()[0]} {cause}")
        for cause, n in self.esp_failures.most_common():
            print(f"  {n:6}  {cause}")

    def _print_notes(self) -> None:
        noted = [(r.name, kind, n) for r in self.phases for kind, n in r.notes.most_common()]
        if noted:
            print("\nnoted (a stray response is one for no transaction in progress):")
        for name, kind, n in noted:
            print(f"  {n:6}  {name}: {kind}")

    @staticmethod
    def _print_log(k: Kamailio, log_dir: Path | None) -> None:
        errors = error_lines(k.log_path)
        where = log_dir / k.log_path.name if log_dir else f"{k.log_path.name} (not kept: KEEP=DIR keeps it)"
        print(f"\n{where}: {sum(errors.values())} ERROR or CRITICAL lines")
        for line, n in errors.most_common(5):
            print(f"  {n:6}x {line[:160]}")


def error_lines(path: Path) -> Counter[str]:
    """Kamailio's ERROR and CRITICAL lines, numbers blanked so that one cause is one line
    (its ALERT lines are the normal "child process exited" of a stop)."""
    out: Counter[str] = Counter()
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for line in f:
            for level in (b" ERROR: ", b" CRITICAL: "):
                at = line.find(level)
                if at >= 0:
                    text = _DIGITS.sub(b"N", line[at + 1:].rstrip())
                    out[text.decode(errors="replace")] += 1
                    break
    return out


def keep_run_dir(run_dir: Path, dest: Path) -> bool:
    """Copy the run dir to `dest` on the host. Inside User-mode Linux the host's / is read-only
    and /tmp, /var/tmp are the guest's own: `dest` (made on the host beforehand, as `make
    load KEEP=...` does) is mounted through hostfs for the copy."""
    if os.environ.get("UML_GUEST") != "1" or _host_writable(dest):
        shutil.copytree(run_dir, dest, dirs_exist_ok=True)
        say(f"run dir kept: {dest}")
        return True
    mnt = tempfile.mkdtemp(prefix="load-keep-", dir="/run")
    done = subprocess.run(["mount", "-t", "hostfs", "-o", str(dest), "hostfs", mnt],
                          capture_output=True, text=True)
    if done.returncode:
        say(f"run dir NOT kept: cannot mount the host's {dest} ({done.stderr.strip()}); "
            "create it on the host first")
        return False
    try:
        shutil.copytree(run_dir, mnt, dirs_exist_ok=True)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
    say(f"run dir kept: {dest} (on the host)")
    return True


def _host_writable(path: Path) -> bool:
    """Whether `path` lies on a read-write hostfs mount of the guest (not tmpfs, not /)."""
    best, fstype, options = "", "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, point, kind, opts, *_ = line.split()
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, fstype, options = point, kind, opts
    return fstype == "hostfs" and best != "/" and "rw" in options.split(",")
