"""Sampling profiles of Kamailio during the timed phases (`make load ... --py-spy DIR`).

py-spy samples every process of the Kamailio tree (the embedded interpreter's Python frames
and, with native frames, Kamailio's own C), 100 times a second, with no hook in the script
and little cost to the processes it watches, unlike cProfile, whose clock reads are system
calls that User-mode Linux makes dear. One collapsed-stack file per phase;
`python -m tools.load.spy DIR/*.txt` prints where the samples fell.
"""
from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


class Spy:
    """py-spy recording one Kamailio tree, phase by phase."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None
        exe = Path(sys.executable).with_name("py-spy")
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")
        if self.exe is None:
            raise RuntimeError("py-spy not found: .venv/bin/python -m pip install py-spy")

    def start(self, pid: int, phase: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^a-z0-9]+", "-", phase.lower()).strip("-")
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
             "--format", "raw", "--output", str(self.out / f"{name}.txt"), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.proc.wait(timeout=60)
            self.proc = None


class Strace:
    """`strace -c` on every process of one Kamailio tree, phase by phase: system calls by
    name and count (a clock read is one inside User-mode Linux: no vDSO there). A count, not
    a price: what calls cost is measured by taking them away (README, "The floor")."""

    def __init__(self, out: Path, log: bool = False) -> None:
        self.out = out
        self.log = log  # every call of every process (strace -ff), beside the table
        self.proc: subprocess.Popen | None = None
        self.exe = shutil.which("strace")
        if self.exe is None:
            raise RuntimeError("strace not found: apt-get install strace")

    def table(self, phase: str) -> Path:
        return self.out / (re.sub(r"[^a-z0-9]+", "-", phase.lower()).strip("-") + ".strace")

    def start(self, pids: list[int], phase: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # -c: the table; -ff: each call of each process with its time, one file per process
        how = ["-ff", "-tt", "-T", "-s", "64"] if self.log else ["-c"]
        args = [self.exe, "-q", *how, "-o", str(self.table(phase))]
        for pid in pids:
            args += ["-p", str(pid)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the phase's first request

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # strace detaches and writes its table
            self.proc.wait(timeout=60)
            self.proc = None


def calls_per_step(path: Path, steps: int) -> str:
    """strace -c's table as system calls per successful step, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    if path.exists():  # strace -c's table
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
    for log in path.parent.glob(path.name + ".*"):  # strace -ff's logs: "TIME name(args) = ..."
        for line in log.read_text(errors="replace").splitlines():
            call = re.match(r"[\d:.]+ (\w+)\(", line)
            if call:
                counts[call.group(1)] += 1
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    per = ", ".join(f"{name} {n / steps:.1f}" for name, n in top if n / steps >= 0.5)
    return f"{total / steps:.1f} system calls per step: {per}"


def summary(path: Path, top: int = 25) -> str:
    """Samples by function: where they fell (self) and what they passed through (total)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    lines = [f"{path.name}: {samples} samples (100 a second, every Kamailio process)",
             f"{'self %':>7} {'total %':>8}  function"]
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / samples:7.1f} {100 * total[name] / samples:8.1f}  {name}")
    lines.append("  -- by total --")
    for name, n in total.most_common(top):
        lines.append(f"{100 * own[name] / samples:7.1f} {100 * n / samples:8.1f}  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (file.py:12)' -> 'func (file.py)'; process prefixes dropped."""
    frame = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"^process \d+:", "", frame)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
        print()
