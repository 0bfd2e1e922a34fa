"""What Kamailio's start costs with many port pairs: processes, time, memory, a first phone.

    tools/with-esp .venv/bin/python -m tools.start_cost [PAIRS ...] [--children N] [-D NAME=VALUE]

For each number of port pairs (default 10 100 208), Kamailio with kamailio.cfg (or --cfg, e.g.
an older checkout's) starts in the e2e rig's namespaces (tests/e2e/pcscf_net.py), IPv4 only
and with the protected ports apart (client 5100.., server 5400..) as tools/load has them.
Reported: seconds until port 5060 answers OPTIONS; a phone that starts registering at that
moment (when its 401 and its 200 OK came); the process count over time and when it stopped
changing (all workers up); PSS and private dirty memory summed over every process
(/proc/PID/smaps_rollup); the most open files one process holds; why Kamailio exited if it
did (its error lines, the guest kernel's OOM lines). A summary table comes last.
On a kernel without ESP, --no-phone still gives the start figures.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests" / "kernel")]

import esp_net  # noqa: E402
from pcscf_net import ADDRS, Kamailio, Phone, Scscf  # noqa: E402

STABLE_FOR = 4.0  # seconds the process count must hold to count as all workers up
HARMLESS = ("clean_sa()", "clean_policy()", "ipsec_cleanall()")  # the C module's own flush


@dataclass
class Run:
    label: str
    answered: float | None = None  # seconds until 5060 answered OPTIONS
    challenged: float | None = None  # the phone's 401
    registered: float | None = None  # the phone's 200 OK
    phone_error: str = ""
    up: float | None = None  # when the process count stopped changing
    announced: float | None = None  # when the P-CSCF logged that every UDP worker is up
    processes: int = 0
    over_time: dict[int, int] = field(default_factory=dict)
    pss_mb: float = 0.0
    private_dirty_mb: float = 0.0
    guest_used_mb: float = 0.0
    open_files: int = 0
    exit_code: int | None = None
    errors: list[str] = field(default_factory=list)
    oom: list[str] = field(default_factory=list)
    log: str = ""


def stamp(pipe, path: Path, t0: float) -> None:
    """Kamailio's log, with the seconds since start in front of each line."""
    with open(path, "a") as log:
        for line in pipe:
            log.write(f"{time.monotonic() - t0:8.3f} {line.decode(errors='replace')}")
            log.flush()


def smaps_mb(pids: list[int]) -> tuple[float, float]:
    """(PSS, private dirty) in MB summed over the processes."""
    pss = dirty = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name == "Pss":
                        pss += int(rest.split()[0])
                    elif name == "Private_Dirty":
                        dirty += int(rest.split()[0])
        except OSError:
            continue
    return pss / 1024, dirty / 1024


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def oom_lines() -> list[str]:
    done = subprocess.run(["dmesg"], capture_output=True, text=True)
    return [l for l in done.stdout.splitlines() if "out of memory" in l.lower() or "oom-kill" in l]


class Counter(threading.Thread):
    """Counts the Kamailio's processes every 0.2 s."""

    def __init__(self, k: Kamailio, t0: float) -> None:
        super().__init__(daemon=True)
        self.k, self.t0 = k, t0
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.t0, len(self.k.processes())))
            time.sleep(0.2)

    def stable_since(self) -> float | None:
        """When the count last changed, once it has held for STABLE_FOR seconds."""
        if not self.samples:
            return None
        now, count = self.samples[-1]
        since = now
        for t, c in reversed(self.samples):
            if c != count:
                break
            since = t
        return since if now - since >= STABLE_FOR else None

    def at(self, t: float) -> int:
        return next((c for ts, c in reversed(self.samples) if ts <= t), 0)


def register(phone: Phone, t0: float, timeout: float) -> tuple[float, float]:
    """The phone's two REGISTER steps, retransmitting as RFC 3261 says and waiting up to
    `timeout` for each answer: (seconds since start at its 401, at its 200 OK)."""
    phone.register(protected=False)
    cseq = f"{phone.cseq} REGISTER"
    r401, _, _ = phone.wait(lambda m: not m.is_request and m.status == 401 and m.get("CSeq") == cseq,
                            "401 to REGISTER", timeout, retransmit=True)
    challenged = time.monotonic() - t0
    phone.tunnel = phone.setup_sas(r401)
    phone.register(protected=True, verify=phone.security_server, response=True)
    phone.wait(lambda m: not m.is_request and m.status == 200 and m.method == "REGISTER",
               "200 to REGISTER", timeout, retransmit=True)
    return challenged, time.monotonic() - t0


def measure(link: esp_net.Link, scscf: Scscf, opts: argparse.Namespace, pairs: int, n: int) -> Run:
    esp_net.flush_ns(link.ue)  # the phone's SAs of the last run (same P-CSCF SPIs again)
    defines = {"IPSEC_MAX_CONNECTIONS": str(pairs), "CHILDREN": str(opts.children),
               "IPSEC_CLIENT_PORT": "5100", "IPSEC_SERVER_PORT": "5400",
               "IPSEC_LISTEN_ADDR6": '""', "IPSEC_SPI_ID_RANGE": "10000"}
    if opts.ipv6:
        defines["IPSEC_LISTEN_ADDR6"] = f'"{ADDRS[6][0]}"'
    defines.update(d.partition("=")[::2] for d in opts.define)
    k = Kamailio(link, Path(tempfile.mkdtemp(prefix="start-cost-")), **defines)
    if not opts.ipv6:
        del k.defines["PCSCF_IP6"]
    args = ["ip", "netns", "exec", link.pc, "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "kamailio", "-f", opts.cfg, "-DD", "-E", "-Y", str(k.run_dir), "-w", str(k.run_dir)]
    for name, value in k.defines.items():
        args += ["-A", f"{name}={value}"]
    extra = " ".join(f"{d}" for d in opts.define)
    run = Run(f"{pairs} pairs{' IPv4+IPv6' if opts.ipv6 else ''}{' ' + extra if extra else ''}")
    ooms, available = len(oom_lines()), mem_available_mb()
    t0 = time.monotonic()
    # a process group of its own, which k.stop() ends (and nothing else)
    k.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
                              start_new_session=True)
    stamper = threading.Thread(target=stamp, args=(k.proc.stdout, k.log_path, t0), daemon=True)
    stamper.start()
    counter = Counter(k, t0)
    counter.start()
    try:
        try:
            k._wait_answers([(4, ADDRS[4][0], 5060)], t0 + opts.limit)
            run.answered = time.monotonic() - t0
        except AssertionError:
            pass
        if run.answered is not None and not opts.no_phone:
            phone = Phone(link, scscf, user=f"first{n}")
            try:
                run.challenged, run.registered = register(phone, t0, opts.limit)
            except AssertionError as e:
                run.phone_error = str(e)
            finally:
                phone.close()
        while (time.monotonic() - t0 < opts.limit and counter.stable_since() is None
               and k.proc.poll() is None):
            time.sleep(0.2)
        run.up = counter.stable_since()
        run.exit_code = k.proc.poll()
        pids = k.processes()
        run.processes = len(pids)
        run.over_time = {t: counter.at(t) for t in (5, 10, 20, 40, 80) if t < time.monotonic() - t0}
        run.pss_mb, run.private_dirty_mb = smaps_mb(pids)
        run.open_files = max((open_files(p) for p in pids), default=0)
        run.guest_used_mb = available - mem_available_mb()
        run.oom = oom_lines()[ooms:]
    finally:
        counter.done.set()
        log_size = k.log_path.stat().st_size if k.log_path.exists() else 0
        k.stop()
        stamper.join(timeout=5)
    run.log = k.log()[:log_size]
    said = [l for l in run.log.splitlines() if "ims-ipsec: started:" in l]
    run.announced = float(said[0].split()[0]) if said else None
    run.errors = [l.strip() for l in run.log.splitlines()
                  if any(w in l for w in ("ERROR", "CRITICAL", "ALERT", "refusing"))
                  and not any(h in l for h in HARMLESS)]
    return run


def report(r: Run) -> None:
    print(f"{r.label}:")
    if r.answered is None:
        print("  never answered OPTIONS on 5060")
    else:
        print(f"  answered OPTIONS on 5060 after {r.answered:.1f} s")
    if r.registered is not None:
        print(f"  a phone starting then had its 401 at {r.challenged:.1f} s and its 200 OK at "
              f"{r.registered:.1f} s")
    elif r.phone_error:
        print(f"  a phone starting then failed: {r.phone_error}")
    if r.exit_code is not None:
        print(f"  Kamailio EXITED ({r.exit_code})")
    elif r.up is not None:
        print(f"  {r.processes} processes, all up at {r.up:.1f} s" + (
            f" (the P-CSCF logged every UDP worker up at {r.announced:.1f} s)" if r.announced else ""))
    else:
        print(f"  {r.processes} processes, still changing")
    print(f"  processes at {', '.join(f'{t} s: {c}' for t, c in r.over_time.items())}")
    if r.processes:
        print(f"  memory: PSS {r.pss_mb:.0f} MB, private dirty {r.private_dirty_mb:.0f} MB "
              f"({r.private_dirty_mb * 1024 / r.processes:.0f} kB a process); the guest has "
              f"{r.guest_used_mb:.0f} MB less available; at most {r.open_files} open files in one process")
    for line in r.errors[:4]:
        print(f"  log: {line[:400]}")
    for line in r.oom[:3]:
        print(f"  kernel: {line}")
    sys.stdout.flush()


def summary(runs: list[Run]) -> None:
    print("\n| run | processes | all up | PSS | private dirty | first phone registered |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        if r.exit_code is not None:
            why = [l for l in r.errors if "refusing" in l or "Cannot fork" in l or "socketpair" in l]
            line = (why or r.errors or [f"exit {r.exit_code}"])[0]
            line = line.split("ims-ipsec: ", 1)[-1] if "ims-ipsec: " in line else line.split(": ", 1)[-1]
            print(f"| {r.label} | exited: {line[:160]} | | | | |")
            continue
        up = f"{r.up:.1f} s" if r.up is not None else "-"
        phone = f"{r.registered:.1f} s" if r.registered is not None else (
            "failed" if r.phone_error else "-")
        print(f"| {r.label} | {r.processes} | {up} | {r.pss_mb:.0f} MB | {r.private_dirty_mb:.0f} MB "
              f"| {phone} |")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.start_cost", description=__doc__.split("\n")[0])
    ap.add_argument("pairs", type=int, nargs="*", default=[10, 100, 208],
                    help="IPSEC_MAX_CONNECTIONS values (default 10 100 208)")
    ap.add_argument("--children", type=int, default=2, help="CHILDREN (default 2)")
    ap.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE",
                    help="more defines, e.g. -D IPSEC_CHILDREN=2 (repeatable)")
    ap.add_argument("--ipv6", action="store_true", help="protected and 5060 sockets on IPv6 too")
    ap.add_argument("--cfg", type=lambda p: str(Path(p).resolve()), default=str(ROOT / "kamailio.cfg"),
                    help="the kamailio.cfg to start (e.g. another checkout's, to compare)")
    ap.add_argument("--nofile", type=int, default=0,
                    help="soft open files limit Kamailio inherits (default: unchanged)")
    ap.add_argument("--limit", type=float, default=180.0, help="seconds to wait for each step")
    ap.add_argument("--no-phone", action="store_true", help="no registration (kernel without ESP)")
    ap.add_argument("--show", metavar="TEXT", help="also print Kamailio's log lines containing TEXT")
    opts = ap.parse_args(argv)
    if opts.nofile:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (opts.nofile, max(hard, opts.nofile)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"{os.cpu_count()} CPU, {mem_available_mb():.0f} MB available, open files limit "
          f"{soft}/{hard}, cfg {opts.cfg}, CHILDREN={opts.children}", flush=True)
    link = esp_net.make_link("cost")
    scscf = Scscf(link)
    runs = []
    try:
        for n, pairs in enumerate(opts.pairs):
            runs.append(measure(link, scscf, opts, pairs, n))
            report(runs[-1])
            if opts.show:
                print("\n".join(l for l in runs[-1].log.splitlines() if opts.show in l))
    finally:
        scscf.close()
        esp_net.drop_link(link)
    summary(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
