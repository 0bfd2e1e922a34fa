"""The module's counters in real Kamailio: read with `kamcmd stats.get_statistics` (ctl) and
scraped over HTTP from xhttp_prom on PROM_PORT, through a registration, a call, a refusal
and a de-registration; the metrics socket is the only one that answers an HTTP GET."""
from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest

from esp_net import ADDRS
from pcscf_net import Kamailio, Phone, _socket, mo_call

PROM_PORT = 9090
PCSCF = ADDRS[4][0]


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio"), PROM_PORT=str(PROM_PORT))
    k.start()
    yield k
    k.stop()
    errors = [l for l in k.log().splitlines() if "Unhandled exception" in l or "Traceback" in l
              or "not defined" in l]
    assert not errors, "errors in Kamailio's log:\n" + "\n".join(errors)


def kamcmd(k: Kamailio, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", k.link.pc, "kamcmd", "-s",
                           f"unix:{k.run_dir}/kamailio_ctl", *args],
                          check=True, capture_output=True, text=True, timeout=10).stdout


def from_kamcmd(k: Kamailio) -> dict[str, int]:
    """`kamcmd stats.get_statistics script:`: lines like `script:ipsec_tunnels_created = 1`."""
    out = kamcmd(k, "stats.get_statistics", "script:")
    return {m[1]: int(m[2]) for m in re.finditer(r"script:(\w+) = (-?\d+)", out)}


def http_get(k: Kamailio, path: str, port: int = PROM_PORT) -> tuple[int, str]:
    s = _socket(k.link.pc, 4, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((PCSCF, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {PCSCF}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            if m and len(body) >= int(m[1]):
                break
    finally:
        s.close()
    assert data, f"no HTTP answer on {PCSCF}:{port}"
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


def scrape(k: Kamailio) -> dict[str, int]:
    status, body = http_get(k, "/metrics")
    assert status == 200, body
    return {m[1]: int(m[2]) for m in re.finditer(r"^kamailio_(\w+) (\d+)", body, re.M)}


def settled(k: Kamailio, want: dict[str, int], timeout: float = 6.0) -> dict[str, int]:
    """Wait for the sweep (every second) to publish; both readers must agree."""
    deadline = time.monotonic() + timeout
    while True:
        stats = from_kamcmd(k)
        if all(stats.get(n) == v for n, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    prom = scrape(k)
    assert {n: prom[f"script_{n}"] for n in stats} == stats
    return stats


def test_counters_move_through_a_registration_a_call_and_a_deregistration(link, scscf, kamailio):
    k = kamailio
    before = settled(k, {"ipsec_leases_free": 500})  # the first sweep has run
    assert before["ipsec_tunnels_created"] == 0 and before["ipsec_leases_free"] == 500
    invites = scrape(k)["core_rcv_requests_invite"]

    phone = Phone(link, scscf, user="counted")
    phone.full_registration()
    s = settled(k, {"ipsec_tunnels_created": 1, "ipsec_leases_used": 1, "ipsec_tunnels_active": 1})
    assert (s["ipsec_tunnels_created"], s["ipsec_leases_used"], s["ipsec_leases_free"],
            s["ipsec_tunnels_active"]) == (1, 1, 499, 1)

    mo_call(phone, scscf)
    assert scrape(k)["core_rcv_requests_invite"] == invites + 1

    phone.register(protected=True, expires=600, verify="ipsec-3gpp;spi-c=1;spi-s=2")
    phone.wait_reply(403, "REGISTER")
    s = settled(k, {"ipsec_security_verify_refused": 1})
    assert (s["ipsec_security_verify_refused"], s["ipsec_replies_403"]) == (1, 1)

    phone.register(protected=True, expires=0, verify=phone.security_server, response=True)
    phone.wait_reply(200, "REGISTER")
    s = settled(k, {"ipsec_tunnels_removed_dereg": 1, "ipsec_leases_used": 0})
    assert (s["ipsec_tunnels_removed_dereg"], s["ipsec_tunnels_removed_expiry"],
            s["ipsec_leases_used"], s["ipsec_leases_free"], s["ipsec_tunnels_active"]) == (
        1, 0, 0, 500, 0)


def test_refusals_of_unprotected_registers_are_counted(link, scscf, kamailio):
    before = from_kamcmd(kamailio)
    phone = Phone(link, scscf, user="plain")
    phone.register(protected=False, client="")
    phone.wait_reply(421, "REGISTER")
    phone.register(protected=False, client=phone.security_client().replace(
        "alg=hmac-sha-1-96", "alg=hmac-sha-256-128"))
    phone.wait_reply(503, "REGISTER")
    want = {n: before[n] + 1 for n in ("ipsec_replies_421", "ipsec_replies_503",
                                       "ipsec_create_failed_phone")}
    s = settled(kamailio, want)
    assert {n: s[n] for n in want} == want


def test_only_the_metrics_socket_answers_http(kamailio):
    status, body = http_get(kamailio, "/metrics", port=5060)
    assert status == 403 and "kamailio_" not in body
    status, _ = http_get(kamailio, "/other")
    assert status == 404
