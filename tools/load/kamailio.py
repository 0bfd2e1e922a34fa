"""Kamailio in the P-CSCF namespace, started as a service manager starts it (clean environment,
absolute cfg, defines with -A), in a process group of its own so that stopping it stops
exactly the processes we started.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

from . import sip
from .net import udp_sockets

START_TIMEOUT = 180.0  # UML forks ~50 Python-loaded workers slowly (notes: 12 s for 84)
STABLE_FOR = 1.5  # seconds the process count must hold before the workers count as up


class Kamailio:
    def __init__(self, ns: str, address: str, cfg: Path, run_dir: Path, name: str,
                 defines: dict[str, str]) -> None:
        self.ns, self.address, self.cfg, self.run_dir = ns, address, cfg, run_dir
        self.defines = defines
        self.log_path = run_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until it answers OPTIONS and all its workers are forked; returns
        the seconds that took."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = ["ip", "netns", "exec", self.ns, "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "kamailio", "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.run_dir),
                "-w", str(self.run_dir)]
        for name, value in self.defines.items():
            args += ["-A", f"{name}={value}"]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True)
        deadline = t0 + START_TIMEOUT
        self._wait_answer(deadline)
        self._wait_workers(deadline)
        return time.monotonic() - t0

    def check_alive(self) -> None:
        """Raise RuntimeError, with the end of its log, when Kamailio's main process is gone."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"kamailio exited {self.proc.returncode}; log {self.log_path}:\n"
                               + self.log_tail())

    def _wait_answer(self, deadline: float) -> None:
        (probe,) = udp_sockets(self.ns, [(self.address, 0)])
        probe.settimeout(0.5)
        port = probe.getsockname()[1]
        try:
            for n in itertools.count():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kamailio did not answer OPTIONS; log {self.log_path}")
                probe.sendto(_options(self.address, port, n), (self.address, 5060))
                try:
                    if sip.status_of(probe.recv(65535)) == 200:
                        return
                except (TimeoutError, ConnectionRefusedError):
                    pass
        finally:
            probe.close()

    def _wait_workers(self, deadline: float) -> None:
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            self.check_alive()
            now_count = len(self.processes())
            if now_count != count:
                count, since = now_count, time.monotonic()
            elif time.monotonic() - since >= STABLE_FOR:
                return
            time.sleep(0.25)

    def processes(self) -> list[int]:
        """Process ids of our process group (main and every worker)."""
        pgid = self.proc.pid
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        fields = f.read().rsplit(b")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == pgid:
                    out.append(int(entry))
        return out

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 15 s; returns when no process of it is left,
        so the next instance can bind the same ports."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 15
        while self.processes():
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
            time.sleep(0.1)
        self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _options(address: str, port: int, n: int) -> bytes:
    return (f"OPTIONS sip:{address}:5060 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {address}:{port};branch=z9hG4bKprobe{n}.{os.getpid()}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{address}>;tag=probe\r\n"
            f"To: <sip:{address}>\r\nCall-ID: probe{n}.{os.getpid()}\r\nCSeq: {n + 1} OPTIONS\r\n"
            f"Content-Length: 0\r\n\r\n").encode()
