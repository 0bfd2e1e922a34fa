"""What the command-line tests share (unit and kernel): running `ims-ipsec` in-process against
a P-CSCF of the tests (scenario.Pcscf), and /proc/net text. The JSON shapes are in cli_json."""
from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ipsec.cli.commands import Env, read_proc_net
from ipsec.cli.main import main
from scenario import Pcscf, challenge, register, reply_to


# -- /proc/net ------------------------------------------------------------------------------

def proc_text(sockets: Iterable[tuple[str, str, int]], name: str) -> str:
    """/proc/net/<name> as the kernel prints it, for these (proto, host, port) sockets."""
    proto, v6 = name.rstrip("6"), name.endswith("6")
    lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
             "   uid  timeout inode"]
    for i, (p, host, port) in enumerate(sorted(sockets)):
        if p != proto or (":" in host) != v6:
            continue
        raw = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, host)
        words = "".join(f"{struct.unpack('=I', raw[j:j + 4])[0]:08X}"
                        for j in range(0, len(raw), 4))
        state = "0A" if proto == "tcp" else "07"
        lines.append(f"{i:4}: {words}:{port:04X} {'0' * len(words)}:0000 {state} "
                     "00000000:00000000 00:00000000 00000000     0        0 1 2 0 0")
    return "\n".join(lines) + "\n"


def sockets_of(listen: Iterable[str]) -> set[tuple[str, str, int]]:
    """scenario.listen_sockets' "udp:10.0.0.1:5060" as (proto, host, port)."""
    out = set()
    for s in listen:
        proto, rest = s.split(":", 1)
        host, _, port = rest.rpartition(":")
        out.add((proto, host.strip("[]"), int(port)))
    return out


# -- running the command line --------------------------------------------------------------

@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class Cli:
    """`ims-ipsec` run in-process against a P-CSCF of the tests: its defines (so the store is
    found as kamailio.cfg's defines say), its kernel (fake or real), its clock."""

    defines: dict[str, str]
    kernel: Any
    clock: Callable[[], float]
    bound: set[tuple[str, str, int]] = field(default_factory=set)
    stdin: str = ""
    tty: bool = False
    between_looks: Callable[[], None] = lambda: None
    procs_read: list[tuple[str, str | None]] = field(default_factory=list)
    real_proc: bool = False  # read the real /proc/net (of --netns) instead of `bound`

    def __call__(self, *argv: str) -> Ran:
        out, err = io.StringIO(), (TtyBuffer() if self.tty else io.StringIO())

        def read_proc(name: str, netns: str | None) -> str:
            self.procs_read.append((name, netns))
            return read_proc_net(name, netns) if self.real_proc else proc_text(self.bound, name)

        def make_env(config, args) -> Env:
            return Env(config, self.kernel, out, err, io.StringIO(self.stdin), json=args.json,
                       clock=self.clock, sleep=lambda _s: self.between_looks(),
                       read_proc=read_proc, settle=0)

        args = [a for name, value in self.defines.items() for a in ("-A", f"{name}={value}")]
        code = main([*args, *argv], make_env=make_env)
        return Ran(code, out.getvalue(), err.getvalue())


def challenged(p: Pcscf, *, ue: str, aor: str, offer: str | None = None) -> str:
    """A phone's first REGISTER answered by a 401: its contact pending, its tunnel staged as
    pending. Returns the Security-Server sent."""
    kw = {"security_client": offer} if offer else {}
    raw = register(aor=aor, contact=f"sip:phone@{ue}:5060", via=f"{ue}:5060", **kw)
    (relay,) = p.request(raw, source=(ue, 5060, "udp")).relays
    rec = p.register_reply(relay, reply_to(raw, 401, "Unauthorized",
                                           (f"WWW-Authenticate: {challenge()}",)))
    return rec.values("Security-Server")[0]
