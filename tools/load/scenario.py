"""The phases of a load run, in order, and the ESP checks between them.

IPsec (this project's kamailio.cfg): 401 step; the phones' SAs (untimed); protected REGISTER;
MO MESSAGE; MT MESSAGE; ESP counters; re-registration storm with new keys, SPIs and client
port (33.203 7.4); ESP counters. Then the relay (tools/load/relay.cfg), same boot, same
phones, every SA and policy flushed from both namespaces: 401 step and the second REGISTER.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable

from .engine import Engine, PhaseResult
from .kamailio import Kamailio
from .net import Link, esp_counters, flush_xfrm
from .phone import Phone
from .report import Report, say
from .spy import Spy, Strace, calls_per_step
from .ue_ipsec import UeTunnel

SCSCF_PORT = 6060

# Where each SA of a tunnel shows in the P-CSCF's `ip -s xfrm state`: (destination, SPI).
SA_KEYS: dict[str, Callable[[UeTunnel], tuple[str, int]]] = {
    "SA1 (port_uc -> port_ps)": lambda t: (t.pcscf, t.spi_ps),
    "SA3 (port_pc -> port_us)": lambda t: (t.ue, t.spi_us),
    "SA4 (port_us -> port_pc)": lambda t: (t.pcscf, t.spi_pc),
}


def sa_keys(t: UeTunnel) -> list[tuple[str, int]]:
    """(destination, SPI) of all four SAs."""
    return [(t.pcscf, t.spi_ps), (t.ue, t.spi_uc), (t.ue, t.spi_us), (t.pcscf, t.spi_pc)]


def alive(phones: list[Phone]) -> list[Phone]:
    return [p for p in phones if p.failed is None]


# --py-spy: the profiler, and the Kamailio whose phases run now
SPY: Spy | None = None
STRACE: Strace | None = None  # --strace: system calls counted per phase
PER_PROCESS = False  # --per-process: the busiest Kamailio processes of each phase
_watched: Kamailio | None = None


def phase(engine: Engine, report: Report, name: str, phones: list[Phone],
          start: Callable[[Phone], None], in_flight: int, timed: bool = True) -> PhaseResult:
    spying = SPY is not None and timed and _watched is not None
    if spying:
        SPY.start(_watched.proc.pid, name)
    pids = _watched.processes() if timed and _watched is not None else []
    tracing = STRACE is not None and bool(pids)
    if tracing:
        STRACE.start(pids, name)
    before = {pid: process_stat(pid) for pid in pids}
    try:
        result = engine.run_phase(name, phones, start, in_flight, timed)
    finally:
        if spying:
            SPY.stop()
        if tracing:
            STRACE.stop()
    spent: dict[int, tuple] = {}
    if pids:
        after = {pid: process_stat(pid) for pid in pids}
        spent = {pid: tuple(a - b for a, b in zip(after[pid], stat))
                 for pid, stat in before.items() if stat and after[pid]}
        result.server_cpu = (sum(s[0] for s in spent.values()), sum(s[1] for s in spent.values()))
        result.server_faults = sum(s[2] for s in spent.values())
    report.add(result)
    say(report.line(result))
    if PER_PROCESS and spent and result.ok:
        say(f"  {name}: " + busiest({pid: s[0] + s[1] for pid, s in spent.items()}, result.ok))
        say(f"  {name}: " + busiest({pid: s[2] for pid, s in spent.items()}, result.ok,
                                    what="page faults"))
    if tracing and result.ok:
        say(f"  {name}: Kamailio's " + calls_per_step(STRACE.table(name), result.ok))
    return result


def busiest(spent: dict[int, float], steps: int, top: int = 5,
            what: str = "ms of CPU") -> str:
    """The processes that used the most CPU (seconds by pid) or took the most page faults
    (`what="page faults"`), per step: Kamailio's log names each process by its pid
    (" 1(854) INFO: ...")."""
    scale, digits = (1000, 2) if what == "ms of CPU" else (1, 1)
    ranked = sorted(spent.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    shown = ", ".join(f"{pid} {scale * n / steps:.{digits}f}" for pid, n in ranked if n > 0)
    return f"busiest Kamailio processes, {what} per step: {shown or 'none measurable'}"


def process_stat(pid: int) -> tuple[float, float, int] | None:
    """User and system CPU seconds a process has used so far, and its page faults (minor and
    major: a copy-on-write fault costs about three system calls in tools/syscall_cost.py's
    loop inside User-mode Linux),
    from /proc/PID/stat; None for a process that is gone (its share is lost, not guessed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]) + int(fields[9])


def ipsec_phases(engine: Engine, link: Link, phones: list[Phone], pcscf: Kamailio,
                 in_flight: int, report: Report, warm: list[Phone] | None = None) -> None:
    """`warm`: phones that register first, untimed, so that the timed phases find the
    P-CSCF as a running one is (its workers' first requests and Kamailio's first touches of
    its shared memory paid); they stay registered, out of every later phase and check."""
    global _watched
    took = pcscf.start()
    _watched = pcscf
    engine.watchdog = pcscf.check_alive
    say(f"P-CSCF (kamailio.cfg) up: {len(pcscf.processes())} processes, {took:.1f} s")
    if warm:
        phase(engine, report, "IPsec warm-up 401 step (untimed)", warm, Phone.start_challenge,
              in_flight, timed=False)
        phase(engine, report, "IPsec warm-up SAs (untimed)", alive(warm), Phone.start_install,
              max(1, len(alive(warm))), timed=False)
        phase(engine, report, "IPsec warm-up protected REGISTER (untimed)", alive(warm),
              Phone.start_authenticate, in_flight, timed=False)
    first = phase(engine, report, "IPsec 401 step", phones, Phone.start_challenge, in_flight)
    ready = alive(phones)
    phase(engine, report, "IPsec phones' SAs (untimed)", ready, Phone.start_install, max(1, len(ready)),
          timed=False)
    before = esp_counters(link.pc)
    second = phase(engine, report, "IPsec protected REGISTER", alive(phones),
                   Phone.start_authenticate, in_flight)
    report.two_step("IPsec", first, second)
    phase(engine, report, "IPsec MO MESSAGE", alive(phones), Phone.start_mo, in_flight)
    phase(engine, report, "IPsec MT MESSAGE", alive(phones), Phone.start_mt, in_flight)
    after = esp_counters(link.pc)
    report.esp("after REGISTER, MO and MT", after,
               esp_failures(before, after, alive(phones), list(SA_KEYS)))
    before = after
    phase(engine, report, "IPsec re-registration storm", alive(phones), Phone.start_rekey,
          in_flight)
    after = esp_counters(link.pc)
    report.esp("after the re-registration storm (new SAs)", after,
               esp_failures(before, after, alive(phones), list(SA_KEYS)[:2]))
    old = [key for p in alive(phones) for key in sa_keys(p.previous)]
    report.esp_info(f"old SAs of the re-keyed phones still on the P-CSCF right after "
                            f"the storm: {sum(1 for key in old if key in after)} of {len(old)}")
    pcscf.stop()


def esp_failures(before: dict, after: dict, phones: list[Phone], names: list[str]) -> Counter[str]:
    """Each phone's named SAs must exist on the P-CSCF and have carried packets since `before`."""
    out: Counter[str] = Counter()
    for p in phones:
        for name in names:
            key = SA_KEYS[name](p.tunnel)
            if key not in after:
                out[f"ESP: the P-CSCF has no {name} of a registered phone"] += 1
            elif after[key] <= before.get(key, 0):
                out[f"ESP: {name} carried nothing on the P-CSCF"] += 1
    return out


RELAY_ROUND_PAUSE = 6.0  # s between relay rounds: TM frees a round's transactions (wait_timer 5 s)


def relay_phases(engine: Engine, link: Link, phones: list[Phone], relay: Kamailio,
                 in_flight: int, report: Report, rounds: int = 1,
                 warm: list[Phone] | None = None) -> None:
    """The reference, `rounds` times over (the report takes the median round's rate). One
    round, the default, compares a cold relay with a cold P-CSCF, as every earlier figure
    did; more rounds show the relay warming up (its first touches of Kamailio's shared
    memory are page faults, ~180 us each in UML), and a pause between them lets TM free the
    last round's transactions (without it, the fourth round of 1,000 phones ran the 64 MB
    pool out)."""
    for p in [*phones, *(warm or [])]:
        p.forget_failure()
    flush_xfrm(link)
    global _watched
    took = relay.start()
    _watched = relay
    engine.watchdog = relay.check_alive
    say(f"relay (tools/load/relay.cfg) up: {len(relay.processes())} processes, {took:.1f} s")
    if warm:
        phase(engine, report, "relay warm-up 401 step (untimed)", warm,
              Phone.start_relay_challenge, in_flight, timed=False)
        phase(engine, report, "relay warm-up REGISTER (untimed)", alive(warm),
              Phone.start_relay_authenticate, in_flight, timed=False)
        time.sleep(RELAY_ROUND_PAUSE)
    for n in range(1, rounds + 1):
        tag = f" #{n}" if rounds > 1 else ""
        if n > 1:
            time.sleep(RELAY_ROUND_PAUSE)
        first = phase(engine, report, f"relay 401 step{tag}", alive(phones),
                      Phone.start_relay_challenge, in_flight)
        second = phase(engine, report, f"relay REGISTER{tag}", alive(phones),
                       Phone.start_relay_authenticate, in_flight)
        report.two_step(f"relay{tag}", first, second, relay_round=True)
    relay.stop()
