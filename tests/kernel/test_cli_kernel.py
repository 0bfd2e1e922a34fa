"""`ims-ipsec` against a real kernel with ESP: every verb on SAs the module installed, their
JSON shapes, counters of real traffic, drift made behind the module's back with `ip xfrm`,
the doctor's fixes carried out as printed, missing listen sockets in a network namespace.

The P-CSCF is the module over the KSR double (as in test_module_kernel) with its Xfrm in the
P-CSCF namespace of a veth pair; the command line gets its own Xfrm there (`--netns`) and
reads that namespace's /proc/net, as an operator's would.
"""
from __future__ import annotations

import contextlib
import itertools
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "kemi" / "double", ROOT / "tests" / "unit", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cli_json import DOCTOR, DROP, FLUSH, LIST, SHOW, STATS, conforms  # noqa: E402
from cli_support import Cli, challenged, sockets_of  # noqa: E402
import invariant  # noqa: E402
from esp_net import Link, drop_link, make_link, run, udp, ue_install  # noqa: E402
from ipsec import tunnel  # noqa: E402
from ipsec.algorithms import esp_algs  # noqa: E402
from ipsec.tunnel import MARKER  # noqa: E402
from ipsec.xfrm import SA, Selector, Xfrm, new_policy, new_sa  # noqa: E402
from ipsec.xfrm.netns import entered  # noqa: E402
from scenario import CK, IK, PCSCF, UE, Pcscf, defines, listen_sockets  # noqa: E402

AOR, BOB, BOB_UE = "sip:alice@ims.example", "sip:bob@ims.example", "10.0.0.3"
_tags = itertools.count()


@pytest.fixture
def net() -> Iterator[Link]:
    """A fresh P-CSCF / phone namespace pair, with the unit scenario's addresses."""
    link = make_link(f"c{next(_tags)}")
    run("ip", "-n", link.pc, "addr", "add", f"{PCSCF}/24", "dev", "veth-pc")
    run("ip", "-n", link.ue, "addr", "add", f"{UE}/24", "dev", "veth-ue")
    run("ip", "-n", link.ue, "addr", "add", f"{BOB_UE}/24", "dev", "veth-ue")
    yield link
    drop_link(link)


@pytest.fixture
def pcscf(tmp_path, net) -> Iterator[Pcscf]:
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"))
    p.module.xfrm = Xfrm(netns=net.pc)
    p.module.store.live_tunnels()  # started: the store exists
    yield p
    try:
        invariant.assert_holds(net.pc, p.module.store.path, settle=0, ours_only=True)
    finally:
        p.module.xfrm.close()
        p.module.store.close()


@pytest.fixture
def cli(pcscf, net) -> Iterator[Cli]:
    c = Cli(defines(pcscf.module.store.path), Xfrm(netns=net.pc), pcscf.clock, real_proc=True)
    yield c
    c.kernel.close()


def ours(x: Xfrm) -> tuple[int, int]:
    return len(x.states(user=MARKER)), len(x.policies(user=MARKER))


@contextlib.contextmanager
def listening(ns: str, sockets: set[tuple[str, str, int]]) -> Iterator[None]:
    """Bind these (proto, host, port) sockets in the namespace, as Kamailio would."""
    held = []
    try:
        for proto, host, port in sorted(sockets):
            with entered(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp"
                                  else socket.SOCK_STREAM)
            held.append(s)
            s.bind((host, port))
            if proto == "tcp":
                s.listen()
        yield
    finally:
        for s in held:
            s.close()


def problems(ran, check: str | None = None) -> list[dict]:
    return [f for f in ran.json["findings"]
            if f["severity"] == "problem" and (check is None or f["check"] == check)]


def kernel_tunnel_of_alice() -> tunnel.Tunnel:
    """Alice's tunnel as the phone holds it (SPIs and ports of scenario's offer and lease)."""
    return tunnel.Tunnel(pcscf=PCSCF, ue=UE, port_pc=5100, port_ps=5200, port_uc=31000,
                         port_us=31001, spi_pc=4096, spi_ps=4097, spi_uc=1111, spi_us=2222,
                         alg="hmac-sha-1-96", ealg="aes-cbc", ck=bytes.fromhex(CK),
                         ik=bytes.fromhex(IK))


def test_every_verb_on_real_sas(pcscf, cli, net):
    pcscf.registered()
    challenged(pcscf, ue=BOB_UE, aor=BOB)
    assert ours(cli.kernel) == (8, 8)
    with listening(net.pc, sockets_of(listen_sockets(pcscf.module.params))):
        ran = cli("--netns", net.pc, "list", "--json")
        conforms(ran.json, LIST)
        assert [(c["aor"], c["state"]) for c in ran.json["contacts"]] == [
            (AOR, "registered"), (BOB, "pending")]
        assert ran.json["contacts"][0]["tunnel"]["kernel"]["ok"]
        assert ran.json["contacts"][1]["pending"]["kernel"]["ok"]

        ran = cli("--netns", net.pc, "show", AOR, "--json")
        conforms(ran.json, SHOW)
        t = ran.json["contacts"][0]["tunnel"]
        assert {(r["auth"], r["crypt"], r["aead"], r["present"], r["differences"] == [])
                for r in t["sas"]} == {("hmac(sha1)", "cbc(aes)", None, True, True)}
        assert all(r["add_time"] > 0 for r in t["sas"])  # the kernel's own clock
        assert all(r["present"] and r["index"] > 0 for r in t["policies"])

        ran = cli("--netns", net.pc, "stats", "--json")
        conforms(ran.json, STATS)
        assert ran.json["kernel"] == {"sas": 8, "policies": 8}
        assert ran.json["tunnels"]["in_use"] == 1 and ran.json["tunnels"]["pending"] == 1

        ran = cli("--netns", net.pc, "doctor", "--json")
        conforms(ran.json, DOCTOR)
        assert ran.code == 0, ran.out
        esp = [f["what"] for f in ran.json["findings"] if f["check"] == "esp"]
        assert esp == ["IPv4 ESP works with all 8 algorithm pairs a phone may choose"]
        assert ours(cli.kernel) == (8, 8)  # the throwaway SAs are gone

        for verb in (["list"], ["show", BOB_UE], ["stats"], ["doctor"]):
            ran = cli("--netns", net.pc, *verb)
            assert ran.code == 0 and ran.out, (verb, ran.err)


def test_show_counts_the_packets_of_real_traffic(pcscf, cli, net):
    pcscf.registered()
    ue_install(net, kernel_tunnel_of_alice())
    assert udp(net.ue, UE, 31000, net.pc, PCSCF, 5200)  # SA1
    assert udp(net.pc, PCSCF, 5200, net.ue, UE, 31000)  # SA2
    assert udp(net.pc, PCSCF, 5100, net.ue, UE, 31001)  # SA3
    assert udp(net.ue, UE, 31001, net.pc, PCSCF, 5100)  # SA4
    assert udp(net.ue, UE, 31001, net.pc, PCSCF, 5100)  # SA4 again
    sas = cli("--netns", net.pc, "show", AOR, "--json").json["contacts"][0]["tunnel"]["sas"]
    assert {r["sa"]: r["packets"] for r in sas} == {"SA1": 1, "SA2": 1, "SA3": 1, "SA4": 2}
    assert all(r["bytes"] > 0 and r["integrity_failed"] == 0 and r["replay"] == 0 for r in sas)
    assert all(r["use_time"] > 0 for r in sas)


def test_drift_when_an_sa_is_deleted_behind_the_modules_back(pcscf, cli, net):
    pcscf.registered()
    run("ip", "-n", net.pc, "xfrm", "state", "delete", "src", UE, "dst", PCSCF,
        "proto", "esp", "spi", "4097")
    with listening(net.pc, sockets_of(listen_sockets(pcscf.module.params))):
        ran = cli("--netns", net.pc, "doctor", "--json")
        assert ran.code == 1
        (f,) = problems(ran)
        assert f["check"] == "drift" and f"SA1 spi 4097 {UE}:31000 -> {PCSCF}:5200" in f["what"]
        assert f["fix"].startswith("ims-ipsec drop --id 1 ")
        kernel = cli("--netns", net.pc, "list", "--json").json["contacts"][0]["tunnel"]["kernel"]
        assert (kernel["ok"], kernel["sas"], kernel["policies"]) == (False, 3, 4)

        ran = cli("--netns", net.pc, "drop", "--id", "1", "--json")  # the fix, as printed
        conforms(ran.json, DROP)
        assert (ran.json["pieces_removed"], ran.json["pieces_already_gone"]) == (7, 1)
        assert ours(cli.kernel) == (0, 0) and pcscf.module.store.contacts_matching() == []
        assert cli("--netns", net.pc, "doctor").code == 0
    pcscf.registered()  # the phone registers again and is served


def test_doctor_finds_a_broken_sa_and_strays_and_its_fixes_work(pcscf, cli, net):
    pcscf.registered()
    # SA3 replaced behind the module's back: same destination and SPI, other algorithms
    run("ip", "-n", net.pc, "xfrm", "state", "delete", "src", PCSCF, "dst", UE,
        "proto", "esp", "spi", "2222")
    md5 = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    sel = Selector(PCSCF, UE, 5100, 31001, user=MARKER)
    cli.kernel.add_sa(SA(PCSCF, UE, 2222, sel, md5, reqid=2222))
    # a whole tunnel with our marker that the store does not know, and someone else's SA
    tunnel.install(cli.kernel, tunnel.Tunnel(PCSCF, "10.0.0.7", 5101, 5201, 41000, 41001,
                                             9000, 9001, 77, 78, "hmac-md5-96", "null",
                                             bytes(16), bytes(16)))
    run("ip", "-n", net.pc, "xfrm", "state", "add", "src", PCSCF, "dst", "10.0.0.8", "proto",
        "esp", "spi", "0x300", "mode", "transport", "enc", "cbc(aes)", "0x" + "22" * 16)

    with listening(net.pc, sockets_of(listen_sockets(pcscf.module.params))):
        ran = cli("--netns", net.pc, "doctor", "--json")
    assert ran.code == 1
    drift = problems(ran, "drift")
    broken = [f for f in drift if f["what"].startswith("contact 1 ")]
    strays = [f for f in drift if not f["what"].startswith("contact 1 ")]
    assert len(broken) == 1 and len(strays) == 8
    assert (f"different in the kernel: SA3 spi 2222 {PCSCF}:5100 -> {UE}:31001: auth "
            "hmac(md5), expected hmac(sha1); crypt ecb(cipher_null), expected cbc(aes)"
            ) in broken[0]["what"]
    assert all("10.0.0.8" not in f["what"] for f in drift)  # not ours: never reported

    for f in strays:  # carry out each printed fix
        command = f["fix"].split(";")[0]
        assert command.startswith(f"ip -n {net.pc} xfrm ")
        subprocess.run(shlex.split(command), check=True)
    verb = shlex.split(broken[0]["fix"].split(" removes")[0])
    assert verb[:3] == ["ims-ipsec", "drop", "--id"]
    assert cli("--netns", net.pc, *verb[1:]).code == 0

    with listening(net.pc, sockets_of(listen_sockets(pcscf.module.params))):
        ran = cli("--netns", net.pc, "doctor", "--json")
    assert ran.code == 0, ran.out
    assert ours(cli.kernel) == (0, 0)
    assert [(s.dst, s.spi) for s in cli.kernel.states()] == [("10.0.0.8", 0x300)]


def test_doctor_finds_missing_listen_sockets_in_the_namespace(pcscf, cli, net):
    expected = sockets_of(listen_sockets(pcscf.module.params))
    with listening(net.pc, expected - {("udp", PCSCF, 5201), ("tcp", PCSCF, 5060)}):
        ran = cli("--netns", net.pc, "doctor", "--json")
    assert ran.code == 1
    assert sorted(f["what"] for f in problems(ran)) == [
        f"tcp {PCSCF}:5060 (unprotected SIP) is not bound",
        f"udp {PCSCF}:5201 (protected server port) is not bound"]
    ran = cli("--netns", net.pc, "doctor", "--json")  # nothing bound: Kamailio is not there
    (f,) = problems(ran)
    assert f["what"] == f"none of the 10 sockets of this P-CSCF is bound in network namespace {net.pc}"


def test_doctor_probes_ipv6_when_the_p_cscf_has_an_ipv6_address(pcscf, cli, net):
    ran = cli("--netns", net.pc, "-A", 'IPSEC_LISTEN_ADDR6="fd00::1"', "doctor", "--json")
    esp = [f["what"] for f in ran.json["findings"] if f["check"] == "esp"]
    assert esp == [f"IPv{v} ESP works with all 8 algorithm pairs a phone may choose"
                   for v in (4, 6)]
    assert ours(cli.kernel) == (0, 0)


def test_flush_removes_ours_only_with_progress(pcscf, cli, net):
    pcscf.registered()
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    requests = []
    for i in range(600):  # + alice: 2,404 SAs and 2,404 policies
        t = tunnel.Tunnel(PCSCF, f"10.1.{i // 250}.{i % 250 + 1}", 5100, 5200, 41000, 41001,
                          20000 + 2 * i, 20001 + 2 * i, 77, 78, "hmac-md5-96", "null",
                          bytes(16), bytes(16))
        requests += [new_sa(sa) for sa in tunnel.sas(t, algs)]
        requests += [new_policy(p) for p in tunnel.policies(t)]
    assert cli.kernel.batch(requests) == [None] * len(requests)
    run("ip", "-n", net.pc, "xfrm", "state", "add", "src", PCSCF, "dst", "10.0.0.8", "proto",
        "esp", "spi", "0x300", "mode", "transport", "enc", "cbc(aes)", "0x" + "22" * 16)
    run("ip", "-n", net.pc, "xfrm", "policy", "add", "src", PCSCF, "dst", "10.0.0.8", "dir",
        "out", "tmpl", "src", PCSCF, "dst", "10.0.0.8", "proto", "esp", "mode", "transport")
    cli.tty = True
    ran = cli("--netns", net.pc, "flush", "--yes", "--json")
    conforms(ran.json, FLUSH)
    assert ran.json == {"contacts": 1, "sas": 2404, "policies": 2404, "leases_released": 1}
    assert "flush: 2,000 of 2,404 policies removed" in ran.err
    assert "flush: 2,404 of 2,404 SAs removed" in ran.err
    assert ours(cli.kernel) == (0, 0)
    assert len(cli.kernel.states()) == 1 and len(cli.kernel.policies()) == 1
    assert pcscf.module.store.contacts_matching() == []
    assert pcscf.module.store.leases_with_age() == []
