"""`make load`: N phones register, message and re-key through this P-CSCF, then through a
plain relay, and the rates are compared. The scenario: tools/load/__init__.py.

    tools/with-esp .venv/bin/python -m tools.load [--phones N] [--in-flight K] ...

Options also come from the LOAD_ARGS environment variable (how `make load` passes them into
User-mode Linux). Exits 1 on any failure, 2 when the rig could not be set up.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ipsec.algorithms import is_valid_pair
from ipsec.xfrm import Xfrm

from .engine import Engine
from .kamailio import Kamailio
from .net import MAX_PHONES, Link, drop_link, make_link, udp_sockets
from .phone import Phone
from .report import Report, keep_run_dir, say
from . import scenario
from .scenario import SCSCF_PORT, ipsec_phases, relay_phases
from .spy import Spy, Strace, summary
from .scscf import Scscf

ROOT = Path(__file__).resolve().parents[2]
PHONE_BASE_PORT, PORT_SLOTS = 10000, 13000  # 4 ports per phone: 10000 .. 61999


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.load", description="Load through this P-CSCF with real ESP, compared with a plain relay.")
    ap.add_argument("--phones", "-n", type=int, default=1000, help="phones (default 1000)")
    ap.add_argument("--in-flight", "-k", type=int, default=20,
                    help="phones with a step in progress at once (default 20)")
    ap.add_argument("--children", type=int, default=2, help="CHILDREN of both Kamailios (default 2)")
    ap.add_argument("--max-connections", type=int, default=10,
                    help="IPSEC_MAX_CONNECTIONS (default 10)")
    ap.add_argument("--alg", default="hmac-sha-1-96", help="the phones' offered alg")
    ap.add_argument("--ealg", default="aes-cbc", help="the phones' offered ealg")
    ap.add_argument("--timeout", type=float, default=32.0,
                    help="seconds a transaction may take (default 32: RFC 3261 timer F)")
    ap.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE",
                    help="more kamailio.cfg defines, e.g. -D EXPIRY_GRACE=10 (repeatable)")
    ap.add_argument("--relay-cfg", metavar="CFG", default=str(ROOT / "tools" / "load" / "relay.cfg"),
                    help="the reference relay's cfg (default tools/load/relay.cfg; "
                         "tools/load/kemi_relay.cfg relays through a KEMI Python script)")
    ap.add_argument("--relay-rounds", type=int, default=1,
                    help="times the reference relay's two phases run, 6 s apart; the ratio is "
                         "taken against the median round (default 1: a cold relay against a "
                         "cold P-CSCF, as every published figure)")
    ap.add_argument("--warm-up", type=int, default=0, metavar="M",
                    help="M more phones register first, untimed, on both Kamailios, so that "
                         "the timed phases measure warm ones (default 0: cold, as every "
                         "published figure)")
    ap.add_argument("--py-spy", action="store_true",
                    help="sample Kamailio with py-spy during each timed phase (one file per phase "
                         "in the run dir's py-spy/, kept with --keep) and print where time went")
    ap.add_argument("--strace", action="store_true",
                    help="count every Kamailio process's system calls during each timed phase "
                         "(strace -c, which slows them: rates are then not comparable) and "
                         "print them per step")
    ap.add_argument("--strace-log", action="store_true",
                    help="as --strace, and keep every call of every process with its time "
                         "(strace -ff: one file per process in the run dir's strace/, kept with "
                         "--keep), to read what one step does in order")
    ap.add_argument("--per-process", action="store_true",
                    help="print each timed phase's busiest Kamailio processes (CPU per step "
                         "by pid; the pids name processes in Kamailio's log)")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy the run dir (Kamailio logs, store) to DIR (absolute) at the end")
    opts = ap.parse_args(argv)
    if opts.relay_rounds < 1:
        ap.error("--relay-rounds: at least 1")
    if opts.warm_up < 0:
        ap.error("--warm-up: 0 or more")
    if not 1 <= opts.phones <= MAX_PHONES - opts.warm_up or opts.in_flight < 1:
        ap.error(f"--phones (with --warm-up): 1..{MAX_PHONES}; --in-flight: at least 1")
    if not is_valid_pair(opts.alg, opts.ealg):
        ap.error(f"not a valid alg/ealg pair: {opts.alg}/{opts.ealg}")
    if opts.keep and not os.path.isabs(opts.keep):
        ap.error("--keep needs an absolute path")
    return opts


def pcscf_defines(opts: argparse.Namespace, address: str, run_dir: Path) -> dict[str, str]:
    """kamailio.cfg defines: protected ports apart from each other and enough SPIs for every
    phone to hold two tunnels during its re-key (a lease takes two)."""
    defines = {
        "PCSCF_IP": address, "IPSEC_LISTEN_ADDR": f'"{address}"',
        "NEXT_HOP": f'"sip:{address}:{SCSCF_PORT}"', "RUN_DIR": f'"{run_dir}"',
        "CHILDREN": str(opts.children), "IPSEC_MAX_CONNECTIONS": str(opts.max_connections),
        "IPSEC_CLIENT_PORT": "5100", "IPSEC_SERVER_PORT": "5300",
        "IPSEC_SPI_ID_START": "4096",
        "IPSEC_SPI_ID_RANGE": str(8 * (opts.phones + opts.warm_up) + 1000),
    }
    for item in opts.define:
        name, _, value = item.partition("=")
        defines[name] = value
    return defines


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))


def make_phones(engine: Engine, link: Link, offer: tuple[str, str],
                cls: type[Phone] = Phone) -> list[Phone]:
    """The phones and their 4 sockets each (plain, port_us, two client ports), all watched."""
    phones = [cls(i, ip, PHONE_BASE_PORT + 4 * (i % PORT_SLOTS), engine, offer)
              for i, ip in enumerate(link.phones)]
    ports = [(p, port) for p in phones for port in (p.port_plain, p.port_us, *p.ports_uc)]
    socks = udp_sockets(link.ue, [(p.ip, port) for p, port in ports])
    for (p, port), s in zip(ports, socks):
        p.socks[port] = s
        engine.watch(s, p.on_datagram, port)
    return phones


def make_stub(engine: Engine, link: Link) -> Scscf:
    (sock,) = udp_sockets(link.pc, [(link.pcscf, SCSCF_PORT)])
    stub = Scscf(sock, (link.pcscf, 5060))
    engine.stub = stub
    engine.watch(sock, stub.on_datagram, SCSCF_PORT)
    return stub


def main(argv: list[str]) -> int:
    opts = parse(shlex.split(os.environ.get("LOAD_ARGS", "")) + argv)
    raise_fd_limit(4 * opts.phones + 1024)
    run_dir = Path(tempfile.mkdtemp(prefix="load-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    offer = (opts.alg, opts.ealg)
    say(f"make load: {opts.phones} phones, {opts.in_flight} in flight, CHILDREN={opts.children}, "
        f"IPSEC_MAX_CONNECTIONS={opts.max_connections}, offer {opts.alg}/{opts.ealg}, "
        f"timeout {opts.timeout:g} s")
    t0 = time.monotonic()
    link = make_link(f"load{os.getpid()}", opts.phones + opts.warm_up)
    xfrm = Xfrm(netns=link.ue)
    engine = Engine(link.pcscf, opts.timeout, xfrm)
    report = Report()
    if opts.py_spy:
        scenario.SPY = Spy(run_dir / "py-spy")
    scenario.PER_PROCESS = opts.per_process
    if opts.strace or opts.strace_log:
        scenario.STRACE = Strace(run_dir / "strace", log=opts.strace_log)
    kamailios: list[Kamailio] = []
    everyone: list[Phone] = []
    try:
        everyone = make_phones(engine, link, offer)
        warm, phones = everyone[:opts.warm_up], everyone[opts.warm_up:]
        make_stub(engine, link)
        say(f"rig ready: {len(everyone)} phone addresses and {4 * len(everyone)} sockets "
            f"({time.monotonic() - t0:.1f} s)")
        pcscf = Kamailio(link.pc, link.pcscf, ROOT / "kamailio.cfg", run_dir, "pcscf",
                         pcscf_defines(opts, link.pcscf, run_dir))
        kamailios.append(pcscf)
        ipsec_phases(engine, link, phones, pcscf, opts.in_flight, report, warm)
        relay = Kamailio(link.pc, link.pcscf, Path(opts.relay_cfg).resolve(), run_dir,
                         "relay", {"PCSCF_IP": link.pcscf, "CHILDREN": str(opts.children),
                                   "NEXT_HOP": f'"sip:{link.pcscf}:{SCSCF_PORT}"',
                                   "KEMI_RELAY": f'"{ROOT / "tools" / "load" / "kemi_relay.py"}"'})
        kamailios.append(relay)
        relay_phases(engine, link, phones, relay, opts.in_flight, report, opts.relay_rounds,
                     warm)
    except RuntimeError as e:
        say(f"load: the rig failed: {e}")
        report.broken = str(e)
    finally:
        for k in kamailios:
            k.stop()
        engine.close()
        xfrm.close()
        for p in everyone:
            for s in p.socks.values():
                s.close()
        drop_link(link)
    for profile in sorted((run_dir / "py-spy").glob("*.txt")):
        print(summary(profile), "\n", flush=True)
    kept = bool(opts.keep) and keep_run_dir(run_dir, Path(opts.keep))
    report.print(kamailios, Path(opts.keep) if kept else None)
    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"load: done in {time.monotonic() - t0:.0f} s")
    if report.broken:
        return 2
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
