"""`make demo`: one registration and one call through real IPsec, told step by step.

Real Kamailio with this project's kamailio.cfg in one network namespace, a phone in another
(joined by a veth pair) that sets up its own SAs with `ip xfrm`, and an S-CSCF stub behind
the P-CSCF. It uses the end-to-end test rig (tests/e2e), so what it shows is what the tests
check. Needs a kernel with ESP: `make demo` runs it in User-mode Linux when this one has none.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests" / "kernel")]

import esp_net  # noqa: E402
from pcscf_net import (Kamailio, Phone, Scscf, assert_kernel_matches, mt_call,  # noqa: E402
                       pcscf_counters, pcscf_policy_count, pcscf_states)

T0 = time.monotonic()


def say(text: str = "") -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {text}" if text else "", flush=True)


def show(title: str, lines: list[str]) -> None:
    say(title)
    for line in lines:
        print(f"           {line}", flush=True)


def kernel_view(link: esp_net.Link) -> list[str]:
    counters = pcscf_counters(link)
    out = []
    for s in sorted(pcscf_states(link), key=lambda s: s["spi"]):
        algs = ", ".join(f"{k} {v[0]}" for k, v in s["algs"].items())
        out.append(f"SA spi {s['spi']:>10}  {s['src']}:{s['sport']} -> {s['dst']}:{s['dport']}"
                   f"  [{algs}]  packets {counters.get(s['spi'], 0)}")
    out.append(f"policies: {pcscf_policy_count(link)}")
    return out


def main() -> int:
    say("Setting up: P-CSCF namespace and phone namespace joined by a veth pair")
    link = esp_net.make_link("demo")
    run_dir = Path(tempfile.mkdtemp(prefix="pcscf-demo-"))
    scscf = Scscf(link)
    kam = Kamailio(link, run_dir)
    phone = Phone(link, scscf, user="alice", offer=("hmac-sha-1-96", "aes-cbc"))
    try:
        took = kam.start()
        say(f"Kamailio 5.6 with kamailio.cfg + kemi/pcscf.py answers OPTIONS ({took:.1f}s to start)")
        say()
        show("1. The phone sends an unprotected REGISTER offering IPsec:",
             [f"Security-Client: {phone.security_client()}"])
        with esp_net.Capture(link, "demo") as cap:
            r401 = phone.challenge(protected=False)
            show("2. The S-CSCF challenges with ck/ik; the P-CSCF chose an offer, installed its SAs, "
                 "and sent the 401 on without the keys:",
                 [f"Security-Server: {r401.get('Security-Server')}",
                  f"WWW-Authenticate: {r401.get('WWW-Authenticate')}"])
            show("3. The P-CSCF's kernel now holds (read with `ip xfrm`):", kernel_view(link))
            say("4. The phone installs its side with `ip xfrm` and REGISTERs again through ESP")
            phone.authenticate()
            assert_kernel_matches(link, phone.tunnel)
            say("   200 OK arrived through ESP (port-c -> the phone's port-s); keys and SPIs match")
            say()
            say("5. A call from the core to the phone, and back: INVITE, 180, 200, ACK, BYE")
            mt_call(phone, scscf)
            show("   Counters after the call:", kernel_view(link))
        t = phone.tunnel
        protected = set(range(5062, 5065)) | {t.port_uc, t.port_us}
        clear = [p for p in cap.cleartext() if p.sport in protected or p.dport in protected]
        show("6. What crossed the phone's link:",
             [f"{len(cap.packets)} packets, ESP SPIs seen {sorted(cap.esp_spis())}",
              f"cleartext between protected ports: {len(clear)}"])
        say()
        say("7. The phone de-registers; the tunnel goes once the 200 OK has left through it")
        phone.register(protected=True, expires=0, verify=phone.security_server, response=True)
        phone.wait_reply(200, "REGISTER")
        deadline = time.monotonic() + 8
        while pcscf_states(link) and time.monotonic() < deadline:
            time.sleep(0.2)
        show("   The P-CSCF's kernel now:", kernel_view(link))
        ok = not clear and not pcscf_states(link)
        say("Done: " + ("everything went through ESP, and nothing is left." if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        kam.stop()
        scscf.close()
        phone.close()
        esp_net.drop_link(link)


if __name__ == "__main__":
    sys.exit(main())
