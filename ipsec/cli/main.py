"""`python -m ipsec` / `ims-ipsec`: options, errors and exit codes (see errors.Exit)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ipsec.xfrm import Xfrm

from . import commands
from .config import Config, ConfigError, defines_from
from .errors import CliError, Exit

DESCRIPTION = """\
The operator's view of a live P-CSCF (ims-ipsec-pcscf): its store and the kernel's XFRM
tables. Read-only except drop and flush. The store and parameters are found from
kamailio.cfg's defines as the P-CSCF finds them (IPSEC_STORE, else RUN_DIR/ipsec-pcscf.sqlite):
give the defines it runs with (-A NAME=VALUE, --cfg kamailio.cfg) or the store (--store).
"""
EPILOG = """\
exit codes: 0 ok, 1 problem found (doctor) or kernel error, 2 usage, 3 store missing or
unreadable, 4 no permission, 5 kernel without ESP (doctor), 6 no such contact (show, drop),
7 flush not confirmed
"""


def _common(parser: argparse.ArgumentParser, after_verb: bool) -> None:
    """The options every verb takes, before or after the verb's name."""
    keep = {"default": argparse.SUPPRESS} if after_verb else {}
    parser.add_argument("--store", metavar="PATH", help="the store file (default: from the "
                        "defines, as the P-CSCF computes it)", **keep)
    parser.add_argument("--cfg", metavar="FILE", help="read the #!define lines of this "
                        "kamailio.cfg (the -A options still win)", **keep)
    parser.add_argument("-A", "--define", metavar="NAME=VALUE", action="append",
                        dest="defines_after" if after_verb else "defines",
                        help="a kamailio.cfg define, as kamailio -A takes it", **(
                            {} if after_verb else {"default": []}))
    parser.add_argument("--netns", metavar="NAME", help="the P-CSCF's network namespace "
                        "(ip netns): its XFRM tables and sockets", **keep)
    parser.add_argument("--json", action="store_true", help="JSON on stdout", **keep)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ims-ipsec", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, after_verb=False)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=text, description=text)
        _common(v, after_verb=True)
        return v

    v = verb("list", "contacts and their tunnels: state, expiry, SPIs, ports, algorithms, "
             "whether the kernel holds them")
    v.add_argument("--aor", help="only this AoR (or contact URI)")
    v.add_argument("--ip", help="only phones on this address")
    for name, text in (("show", "one phone: contact, tunnels, their 4 SAs and 4 policies as "
                        "the kernel has them, with counters"),
                       ("drop", "remove one phone's tunnel(s): kernel, store and lease "
                        "(the phone registers again)")):
        v = verb(name, text)
        v.add_argument("target", nargs="?", metavar="AOR|IP",
                       help="an AoR (sip: may be left out), contact URI or IP address")
        v.add_argument("--id", type=int, help="the contact id (as list shows it)")
    verb("stats", "contacts and tunnels by state, SPI pairs free and used, port-pair use")
    verb("doctor", "check ESP and every algorithm, listen sockets, the store, and drift "
         "between store and kernel; say what to do")
    v = verb("flush", "remove every tunnel of this P-CSCF (kernel entries with our marker, "
             "contacts, leases), after confirmation")
    v.add_argument("--yes", action="store_true", help="do not ask")
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.defines = [*args.defines, *(getattr(args, "defines_after", None) or [])]
    if args.verb in ("show", "drop") and (args.target is None) == (args.id is None):
        p.error(f"{args.verb}: give an AoR or IP address, or --id N (one of them)")
    return args


def config_of(args: argparse.Namespace) -> Config:
    text = None
    if args.cfg:
        try:
            with open(args.cfg) as f:
                text = f.read()
        except OSError as e:
            raise CliError(Exit.USAGE, f"--cfg {args.cfg}: {e.strerror}") from None
    try:
        return Config.build(defines_from(text, args.defines), store=args.store, netns=args.netns)
    except ConfigError as e:
        raise CliError(Exit.USAGE, str(e)) from None


def run(env: commands.Env, args: argparse.Namespace) -> int:
    if args.verb == "list":
        return commands.cmd_list(env, args.aor, args.ip)
    if args.verb == "show":
        return commands.cmd_show(env, args.target, args.id)
    if args.verb == "stats":
        return commands.cmd_stats(env)
    if args.verb == "doctor":
        return commands.cmd_doctor(env)
    if args.verb == "drop":
        return commands.cmd_drop(env, args.target, args.id)
    return commands.cmd_flush(env, args.yes)


def real_env(config: Config, args: argparse.Namespace) -> commands.Env:
    return commands.Env(config, Xfrm(netns=config.netns), sys.stdout, sys.stderr, sys.stdin,
                        json=args.json)


def main(argv: Sequence[str] | None = None,
         make_env: Callable[[Config, argparse.Namespace], commands.Env] = real_env) -> int:
    args = parse(argv)
    env = None
    try:
        env = make_env(config_of(args), args)
        return int(run(env, args))
    except CliError as e:
        (env.err if env is not None else sys.stderr).write(f"ims-ipsec: {e}\n")
        return int(e.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ims-ipsec list | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    finally:
        if env is not None:
            env.close()
            env.xfrm.close()
