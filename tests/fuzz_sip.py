"""Hostile SIP through the routing: every parser the routing uses, whole messages, any source.

Run: .venv/bin/python -m tests.fuzz_sip [--count N] [--seconds S] [--seed X] [--jobs J]
(`make fuzz` runs 1,000,000; tests/unit/test_fuzz_routing.py runs 10,000 in CI; the same
messages go to real Kamailio in tests/e2e/test_hostile.py.)

Messages are built from seeds a phone or the core would send (REGISTER unprotected and
protected, INVITE, MESSAGE, CANCEL, ACK, BYE with Route, OPTIONS, and replies: 401 with keys,
200, 180) and made hostile: a header value replaced by one from a list of known troublemakers
(blank, non-ASCII digits, CR/LF/ESC/NUL, tel:, ';' and '@' in odd places, unclosed brackets,
huge numbers, very long values), headers dropped or repeated, the first line changed, then
character mutations. Each goes through the routing script (kemi/routing.py, kemi/replies.py)
over the KSR double, a real SQLite store with registered phones, and the fake kernel, from one
of: the phone's unprotected port, the core, a stranger, the phone's SAs (both pairs), a
stranger on a protected port.

A finding is: an exception out of the routing; a request that changed the store or the kernel
(no request may: state changes only on the core's replies); a reply leaving with ck=/ik=;
store and kernel disagreeing. Messages Kamailio's core would refuse before any script runs
(no SIP first line, no Via, a line that is no header) are counted apart, not routed; the
e2e test sends those too. Exit status 1 on findings.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "kemi" / "double", ROOT / "tests" / "unit", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import KSR  # noqa: E402  (the double)

from scenario import (CORE, OFFER, PCSCF, PORT_UC, PORT_US, UE, Pcscf,  # noqa: E402
                      challenge, register, reply_to, request, server_param)

STRANGER = "10.0.0.66"
ARABIC = "\u0665\u0660\u0666\u0660"
HOSTILE = [
    "", " ", ",", " , ", ";", "<", ">", "<>", "@", "@@", ":", "[", "]", "[::1", "\"", "\\",
    "\r", "\n", "\r\n", "\r\nVia: SIP/2.0/UDP 6.6.6.6", "\x1b[2J", "\x00", "\x7f", "\u202e",
    "\u2028", "é", ARABIC, "\u00b2", "\uff15\uff10\uff16\uff10", "0", "-1", "65536", "99999999999999999999",
    "4294967296", "1e3", "0x10", "tel:+4912345", "tel:+1;phone-context=x", "sip:", "sips:",
    "sip:@", "sip::5060", "sip:a@", "sip:a@b@c", "sip:+1;npdi@10.0.0.2", "sip:10.0.0.2:0",
    f"sip:{UE}:{ARABIC}", "sip:[2001:db8::1", "sip:[2001:db8::1]x", "sip:a@b;alias=1~2~9",
    f"sip:a@b;alias={UE}~{PORT_US}~1", "sip:a@b;alias=~~", "sip:a@b;transport=sctp",
    "sip:a@b;transport=", "<sip:alice@ims.example", "sip:alice@ims.example>", "*", "* ,*",
    "SIP/2.0/UDP", "SIP/2.0/UDP ;branch=x", f"SIP/2.0/UDP {UE}:{ARABIC}", "SIP/2.0/XYZ h",
    "SIP/3.0/UDP h", "SIP/2.0/UDP [::1", "ipsec-3gpp", "ipsec-3gpp;spi-c=;spi-s=",
    "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1;spi-s=2;port-c=0;port-s=99999",
    "digest, ipsec-3gpp;alg=x", "sec-agree", "sec-agree, sec-agree", 'Digest ck="00", ik=',
    'Digest realm="r", ck="' + "0" * 32 + '"', "x" * 5000, "a" * 70000, ";" * 500, "<" * 200,
    "%00", "%0d%0a", "sip:%61lice@ims.example", "Digest " + ", ".join(["a=b"] * 300),
]
METHODS = ["REGISTER", "INVITE", "MESSAGE", "CANCEL", "ACK", "BYE", "OPTIONS", "SUBSCRIBE",
           "NOTIFY", "PRACK", "UPDATE", "INFO", "REFER", "PUBLISH", "FOO", "register", "",
           "INV\x00ITE", "R\u0115GISTER"]
MUTATION_CHARS = [";", "=", ",", '"', "\\", " ", "\t", "\r\n", "\r\n ", "\r", "\n", "\x00",
                  "\x7f", "é", ARABIC, "[", "]", ":", "@", "<", ">", "0", "9", "-", "ck=", "ik="]
SOURCES = ("phone", "core", "stranger", "sa-uc", "sa-us", "stranger-protected")


def seeds(server: str) -> list[tuple[str, str]]:
    """(message, kind) a phone or the core sends; `server`: the registered phone's
    Security-Server (so protected seeds pass the Security-Verify check unless mutated)."""
    ps, pc = int(server_param(server, "port-s")), int(server_param(server, "port-c"))
    reg = register()
    return [
        (reg, "request"),
        (register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=7), "request"),
        (register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=8, expires=0), "request"),
        (request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}",
                 extra=(f"Security-Verify: {server}", "Require: sec-agree",
                        "Proxy-Require: sec-agree")), "request"),
        (request("MESSAGE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060",
                 extra=(f"Route: <sip:{PCSCF}:5060;lr>",)), "request"),
        (request("INVITE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060"), "request"),
        (request("CANCEL", f"sip:alice@{UE}:5060", via=f"{CORE}:5060"), "request"),
        (request("ACK", f"sip:alice@{UE}:5060", via=f"{CORE}:5060", to_tag="t"), "request"),
        (request("BYE", "sip:bob@10.0.0.50:5060", via=f"{UE}:{PORT_UC}", to_tag="t1",
                 extra=(f"Route: <sip:{PCSCF}:{ps};lr>, <sip:{CORE}:5060;lr>",)), "request"),
        (request("BYE", f"sip:alice@{UE}:{PORT_US}", via=f"{CORE}:5060", to_tag="t2",
                 extra=(f"Route: <sip:{PCSCF}:5060;r2=on;lr>, <sip:{PCSCF}:{pc};r2=on;lr>",)),
         "request"),
        (request("OPTIONS", f"sip:{PCSCF}:5060", via=f"{STRANGER}:5060"), "request"),
        (reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)), "reply"),
        (reply_to(reg, 200, "OK", (f"Contact: <sip:alice@{UE}:5060>;expires=600",)), "reply"),
        (reply_to(request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}"), 180,
                  "Ringing"), "reply"),
    ]


def _lines(msg: str) -> tuple[str, list[str], str]:
    head, _, body = msg.partition("\r\n\r\n")
    first, *headers = head.split("\r\n")
    return first, headers, body


def _join(first: str, headers: list[str], body: str) -> str:
    return "\r\n".join([first, *headers]) + "\r\n\r\n" + body


def _hostile(rng: random.Random) -> str:
    value = rng.choice(HOSTILE)
    if rng.random() < 0.3:
        value = rng.choice(HOSTILE) + value + rng.choice(HOSTILE)
    return value


def _structural(rng: random.Random, msg: str) -> str:
    first, headers, body = _lines(msg)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        if op <= 2 and headers:  # a value replaced, whole or in part
            i = rng.randrange(len(headers))
            name, _, value = headers[i].partition(":")
            if rng.random() < 0.5 or not value:
                value = " " + _hostile(rng)
            else:
                a = rng.randrange(len(value) + 1)
                value = value[:a] + _hostile(rng) + value[rng.randrange(a, len(value) + 1):]
            headers[i] = f"{name}:{value}"
        elif op == 3 and headers:
            del headers[rng.randrange(len(headers))]
        elif op == 4 and headers:
            headers.insert(rng.randrange(len(headers) + 1), rng.choice(headers))
        elif op == 5:
            name = rng.choice(["Via", "v", "To", "t", "Contact", "m", "Route", "Security-Verify",
                               "Security-Client", "Require", "Proxy-Require", "Expires", "CSeq",
                               "WWW-Authenticate", "Proxy-Authenticate", "Max-Forwards", "From",
                               "Call-ID", "Supported", "Record-Route", "Path"])
            headers.insert(rng.randrange(len(headers) + 1), f"{name}: {_hostile(rng)}")
        elif op == 6:  # the first line
            parts = first.split(" ", 2)
            if first.startswith("SIP/2.0"):
                parts[1] = rng.choice(["401", "200", "100", "999", "0", "abc", ARABIC[:3], "-1"])
            elif rng.random() < 0.5:
                parts[0] = rng.choice(METHODS)
            elif len(parts) > 1:
                parts[1] = _hostile(rng) or "sip:x"
            first = " ".join(parts)
        elif op == 7 and headers:  # CSeq's method and the first line's disagree
            headers = [f"CSeq: 1 {rng.choice(METHODS)}" if h.lower().startswith("cseq") else h
                       for h in headers]
        else:
            body = _hostile(rng)
    return _join(first, headers, body)


def _chars(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        op = rng.randrange(6)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + rng.choice(MUTATION_CHARS) + text[i:]
        elif op == 2:
            text = text[:j] + text[i:j] + text[j:]
        elif op == 3:
            text = text[:i] + text[i:j].swapcase() + text[j:]
        elif op == 4:
            text = text[:i] + chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0x80, 0xd800),
                                              rng.randrange(0xe000, 0x110000)])) + text[j:]
        else:
            text = text[:i] + text[i:j] * rng.randint(2, 20) + text[j:]
    return text


def messages(rng: random.Random, pool: list[tuple[str, str]]):
    """An endless stream of (message, kind, source)."""
    while True:
        msg, kind = rng.choice(pool)
        roll = rng.random()
        if roll < 0.6:
            msg = _structural(rng, msg)
        elif roll < 0.95:
            msg = _chars(rng, _structural(rng, msg) if rng.random() < 0.5 else msg)
        yield msg, kind, rng.choice(SOURCES)


# -- the core's gate: what Kamailio refuses before any script runs ---------------------------

_REQUEST_LINE = re.compile(r"[A-Za-z!%*_+`'~.-]+ \S+ SIP/2\.0")
_STATUS_LINE = re.compile(r"SIP/2\.0 [1-6][0-9]{2}( .*)?")


def core_accepts(msg: str):
    """The double's parse of `msg`, or None where Kamailio's core would drop it (no SIP first
    line, a line that is no header, no Via)."""
    first = msg.split("\r\n", 1)[0]
    if not (_REQUEST_LINE.fullmatch(first) or _STATUS_LINE.fullmatch(first)):
        return None
    try:
        parsed = KSR.parse(msg)
    except ValueError:
        return None
    if not parsed.bodies("Via") or not all(n.strip() for n, _ in parsed.headers):
        return None
    return parsed


# -- the harness ------------------------------------------------------------------------------

class Harness:
    """The P-CSCF over the double with one registered phone; routes one message at a time."""

    def __init__(self, store_path: str) -> None:
        import kemi.pcscf  # the entry points, as Kamailio calls them
        self.p = Pcscf.start(store_path)
        self.server = self.p.registered()
        self.ps = int(server_param(self.server, "port-s"))
        self.pc = int(server_param(self.server, "port-c"))
        self.app = kemi.pcscf.kamailio(self.p.routing)
        reg = register(security_client=OFFER.replace("1111", "7777").replace("2222", "8888"),
                       cseq=3, via="10.0.0.3:5060", aor="sip:fuzz@ims.example",
                       contact="sip:fuzz@10.0.0.3:5060")
        self.register_relay = self.p.request(reg, source=("10.0.0.3", 5060, "udp")).relays[0]
        self.pool = seeds(self.server)

    def _where(self, source: str):
        return {
            "phone": ((UE, 5060, "udp"), (PCSCF, 5060)),
            "core": ((CORE, 5060, "udp"), (PCSCF, 5060)),
            "stranger": ((STRANGER, 5060, "udp"), (PCSCF, 5060)),
            "sa-uc": ((UE, PORT_UC, "udp"), (PCSCF, self.ps)),
            "sa-us": ((UE, PORT_US, "udp"), (PCSCF, self.pc)),
            "stranger-protected": ((STRANGER, 40000, "udp"), (PCSCF, self.ps)),
        }[source]

    def _state(self) -> tuple:
        k = self.p.kernel
        return (self.p.module.store._db().total_changes, len(k.sas), len(k.policies_by_id),
                tuple(sorted(k.sas)))

    def one(self, msg: str, kind: str, source: str) -> str:
        """Route one message: what became of it, or a finding's description."""
        parsed = core_accepts(msg)
        if parsed is None:
            return "core-refused"
        src, local = self._where(source)
        before = self._state()
        try:
            if parsed.is_request:
                rec = KSR._load_request(msg, src, local)
                self.p.routing.request(KSRMessage())
                if self._state() != before:
                    return "finding: a request changed the store or the kernel"
                if rec.relays:
                    return "request relayed"
                return f"request answered {rec.replies[-1].code}" if rec.replies else "request absorbed"
            return self._reply(msg, kind, source)
        except Exception as e:  # noqa: BLE001 - anything escaping is the finding
            where = traceback.extract_tb(e.__traceback__)[-1]
            return f"finding: {type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {str(e)[:120]}"

    def _reply(self, msg: str, kind: str, source: str) -> str:
        """Half the replies match no transaction (the reply route); half answer a REGISTER
        the routing relayed (the reply route lets them on, then ksr_register_reply)."""
        in_transaction = source in ("core", "phone", "sa-uc")
        rec = KSR._load_reply(msg, self.register_relay, source=(CORE, 5060, "udp"),
                              in_transaction=in_transaction)
        if self.app.ksr_reply_route(None) == 1 and in_transaction:
            self.p.routing.register_reply(KSRMessage())
        if rec.dropped:
            return "reply dropped"
        if not rec.dropped:
            out = "\n".join(rec.values("WWW-Authenticate") + rec.values("Proxy-Authenticate"))
            if re.search(r"(?:^|[\s,;])(?:ck|ik)\s*=", out, re.I):
                return "finding: a reply leaves with ck/ik"
        return self._consistent() or "reply forwarded"

    def _consistent(self) -> str | None:
        """Every SA the store's tunnels name is in the kernel, and nothing else of ours."""
        want = set()
        for c in self.p.module.store.contacts_matching():
            for t in (c.tunnel, c.pending):
                if t is not None:
                    want |= {(t.ue.host, t.ue.spi_uc), (t.ue.host, t.ue.spi_us),
                             (t.pcscf_host, t.lease.spi_pc), (t.pcscf_host, t.lease.spi_ps)}
        have = set(self.p.kernel.sas)
        if want != have:
            return f"finding: store and kernel disagree ({len(want)} vs {len(have)} SAs)"
        return None


from kemi.message import KsrMessage as KSRMessage  # noqa: E402


def run_batch(seed: int, count: int, seconds: float) -> tuple[int, dict[str, int], dict[str, str]]:
    """`count` messages from one seed in a fresh harness: (done, counts, findings)."""
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(str(Path(tmp) / "fuzz.sqlite"))
        rng = random.Random(seed)
        counts: dict[str, int] = {}
        findings: dict[str, str] = {}
        start, done = time.monotonic(), 0
        for msg, kind, source in messages(rng, h.pool):
            if done >= count or time.monotonic() - start > seconds:
                break
            result = h.one(msg, kind, source)
            done += 1
            key = result
            if key.startswith("finding"):
                findings.setdefault(key, repr(msg)[:400] + f" from {source}")
                key = "finding"
            counts[key] = counts.get(key, 0) + 1
        h.p.module.store.close()
        return done, counts, findings


def run(count: int, seconds: float, seed: int, jobs: int) -> int:
    per = -(-count // jobs)
    start = time.monotonic()
    args = [(seed + i, min(per, count - i * per), seconds) for i in range(jobs)]
    if jobs == 1:
        results = [run_batch(*args[0])]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.starmap(run_batch, args)
    done = sum(r[0] for r in results)
    counts: dict[str, int] = {}
    findings: dict[str, str] = {}
    for _, c, f in results:
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        findings.update(f)
    elapsed = time.monotonic() - start
    print(f"{done} messages in {elapsed:.1f} s (seed {seed}, {jobs} job(s)): "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{len(findings)} findings")
    for what, example in findings.items():
        print(f"  {what}\n    input: {example}")
    return 1 if findings else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    raise SystemExit(run(args.count, args.seconds, args.seed, args.jobs))


if __name__ == "__main__":
    main()
