"""`ims-ipsec` against a real SQLite store written by the real module, and the fake kernel.

Each test registers phones through the module and the routing script (scenario.Pcscf), then
runs the command line in-process with the P-CSCF's own defines: the store is found the way
kamailio.cfg's defines say, and the kernel is the FakeKernel the module wrote to.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cli_json import CHECKS, DOCTOR, DROP, FLUSH, LIST, SEVERITIES, SHOW, STATS, conforms
from cli_support import Cli, challenged, sockets_of
from ipsec import tunnel
from ipsec.algorithms import esp_algs
from ipsec.store import Store
from ipsec.tunnel import MARKER
from ipsec.xfrm import SA, Selector, XfrmError, new_policy, new_sa
from ipsec.xfrm import structs as k
from scenario import AOR, PCSCF, UE, Pcscf, defines, listen_sockets

BOB, BOB_UE = "sip:bob@ims.example", "10.0.0.3"
OTHER_MARKER = 143956232  # the C module's


@pytest.fixture
def cli(pcscf):
    pcscf.module.store.live_tunnels()  # the P-CSCF has started: its store exists
    return Cli(defines(pcscf.module.store.path), pcscf.kernel, pcscf.clock,
               sockets_of(listen_sockets(pcscf.module.params)))


def two_phones(p: Pcscf) -> None:
    p.registered()
    challenged(p, ue=BOB_UE, aor=BOB)


def findings(ran, severity: str | None = None, check: str | None = None) -> list[dict]:
    return [f for f in ran.json["findings"]
            if (severity is None or f["severity"] == severity)
            and (check is None or f["check"] == check)]


def first_sa_of(p: Pcscf, spi: int):
    return next(key for key, sa in p.kernel.sas.items() if sa.spi == spi)


# -- finding the store and the parameters -----------------------------------------------------

def test_missing_store_is_exit_3_with_what_to_do(tmp_path, pcscf):
    c = Cli(defines(str(tmp_path / "nowhere.sqlite")), pcscf.kernel, pcscf.clock)
    ran = c("list")
    assert ran.code == 3 and "does not exist" in ran.err and "--store" in ran.err
    assert not (tmp_path / "nowhere.sqlite").exists()  # never created by looking


def test_store_found_from_run_dir_when_ipsec_store_is_empty(tmp_path):
    run_dir = tmp_path / "run"
    overrides = {"IPSEC_STORE": '""', "RUN_DIR": f'"{run_dir}"'}
    p = Pcscf.start("unused", **overrides)
    try:
        p.registered()
        c = Cli(defines("unused", **overrides), p.kernel, p.clock)
        ran = c("--json", "list")
        assert p.module.store.path == str(run_dir / "ipsec-pcscf.sqlite")
        assert ran.code == 0 and ran.json["store"] == p.module.store.path
        assert [c["aor"] for c in ran.json["contacts"]] == [AOR]
    finally:
        p.module.store.close()


def test_store_option_wins_over_the_defines(tmp_path, pcscf, cli):
    pcscf.registered()
    cli.defines["IPSEC_STORE"] = '"/nonexistent/x.sqlite"'
    ran = cli("list", "--store", pcscf.module.store.path, "--json")
    assert ran.code == 0 and [c["aor"] for c in ran.json["contacts"]] == [AOR]


def test_cfg_file_defines_are_read_and_dash_a_wins(tmp_path, pcscf, cli):
    pcscf.registered()
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(f'#!define IPSEC_STORE "{pcscf.module.store.path}"\n'
                   "#!define IPSEC_SPI_ID_START 9999\n")
    c = Cli({"IPSEC_SPI_ID_START": "4096"}, pcscf.kernel, pcscf.clock)
    ran = c("--cfg", str(cfg), "--json", "stats")
    assert ran.code == 0 and ran.json["spi_pairs"]["first_spi"] == 4096
    assert ran.json["contacts"]["total"] == 1


def test_empty_store_file_is_exit_3(tmp_path, pcscf):
    path = tmp_path / "empty.sqlite"
    path.touch()
    ran = Cli(defines(str(path)), pcscf.kernel, pcscf.clock)("stats")
    assert ran.code == 3 and "empty" in ran.err


def test_store_of_another_schema_version_is_exit_3(pcscf, cli):
    db = sqlite3.connect(pcscf.module.store.path)
    db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    ran = cli("list")
    assert ran.code == 3 and "schema version 1" in ran.err


def test_an_unprivileged_user_gets_exit_4_for_the_store_and_for_the_kernel(pcscf, cli):
    """Really as user nobody: the P-CSCF's store (0600, root's) cannot be opened; a store it
    may open gets as far as the kernel, which refuses XFRM without CAP_NET_ADMIN."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              sys.executable, "-m", "ipsec"]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([*nobody, "--store", pcscf.module.store.path, "list"],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 4 and "no permission" in done.stderr
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o777)
        store = Store(str(shared / "s.sqlite"), spi_start=4096, spi_range=100, client_port=5100,
                      server_port=5200, max_connections=2)
        store.live_tunnels()
        store.close()
        (shared / "s.sqlite").chmod(0o666)
        done = subprocess.run([*nobody, "--store", str(shared / "s.sqlite"), "list"],
                              capture_output=True, text=True, cwd=root)
        assert done.returncode == 4 and "CAP_NET_ADMIN" in done.stderr
    finally:
        shutil.rmtree(shared)


def test_no_permission_on_the_kernel_is_exit_4(pcscf, cli, mocker):
    mocker.patch.object(pcscf.kernel, "states",
                        side_effect=XfrmError("dump", errno.EPERM, "SAs"))
    ran = cli("list")
    assert ran.code == 4 and "CAP_NET_ADMIN" in ran.err


@pytest.mark.parametrize("bad", ["IPSEC_CLIENT_PORT=abc", "IPSEC_PREFERRED_ALG=sha3", "=1"])
def test_bad_define_is_a_usage_error_naming_it(cli, bad, capsys):
    assert cli("-A", bad, "list").code == 2
    err = capsys.readouterr().err
    assert err.startswith("ims-ipsec: ") and bad.partition("=")[0].lower() in err.lower()


@pytest.mark.parametrize("argv", [["show"], ["drop"], ["show", "x", "--id", "1"], ["nope"]])
def test_bad_usage_exits_2(cli, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    assert e.value.code == 2


# -- list ------------------------------------------------------------------------------------------

def test_list_shows_contacts_tunnels_and_whether_the_kernel_holds_them(pcscf, cli):
    server = pcscf.registered()
    challenged(pcscf, ue=BOB_UE, aor=BOB)
    ran = cli("list")
    assert ran.code == 0
    alice, bob = ran.out.splitlines()[1:3]
    assert alice.split()[:5] == ["1", AOR, "udp", f"{UE}:5060", "registered"]
    assert "in use" in alice and "4096/4097" in alice and "5100/5200" in alice
    assert "1111/2222" in alice and "31000/31001" in alice
    assert "hmac-sha-1-96/aes-cbc" in alice and alice.endswith("ok")
    assert "spi-c=4096" in server
    assert bob.split()[:5] == ["2", BOB, "udp", f"{BOB_UE}:5060", "pending"]
    assert "pending" in bob.split()[5:] and bob.endswith("ok")
    assert ran.out.splitlines()[-1] == "2 contact(s), 2 tunnel(s)"


def test_list_json_has_the_documented_shape(pcscf, cli):
    two_phones(pcscf)
    ran = cli("list", "--json")
    conforms(ran.json, LIST)
    alice, bob = ran.json["contacts"]
    assert alice["tunnel"]["role"] == "in_use" and alice["pending"] is None
    assert bob["tunnel"] is None and bob["pending"]["role"] == "pending"
    assert alice["tunnel"]["kernel"] == {"ok": True, "sas": 4, "policies": 4,
                                         "missing": [], "differs": []}
    assert alice["expires_in"] == pytest.approx(600, abs=1)
    assert (alice["transport"], alice["received"]) == ("udp", {"host": UE, "port": 5060,
                                                                "proto": "udp"})


def test_list_filters_by_aor_with_or_without_scheme_and_by_ip(pcscf, cli):
    two_phones(pcscf)
    assert [c["aor"] for c in cli("list", "--aor", "bob@ims.example", "--json")
            .json["contacts"]] == [BOB]
    assert [c["aor"] for c in cli("list", "--ip", UE, "--json").json["contacts"]] == [AOR]
    assert cli("list", "--ip", "10.9.9.9", "--json").json["contacts"] == []
    assert cli("list", "--ip", "not-an-ip").code == 2
    assert cli("list", "--aor", "carol@ims.example").out == "no contacts\n"


def test_list_names_pieces_missing_from_the_kernel(pcscf, cli):
    pcscf.registered()
    del pcscf.kernel.sas[first_sa_of(pcscf, 4097)]
    k_ = cli("list", "--json").json["contacts"][0]["tunnel"]["kernel"]
    assert k_["ok"] is False and (k_["sas"], k_["policies"]) == (3, 4)
    assert k_["missing"] == [f"SA1 spi 4097 {UE}:31000 -> {PCSCF}:5200"]
    assert "1 SA/0 pol missing" in cli("list").out


# -- show ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [[AOR], ["alice@ims.example"], [UE], ["--id", "1"],
                                    [f"sip:alice@{UE}:5060"]])
def test_show_finds_the_phone_by_aor_uri_ip_or_id(pcscf, cli, target):
    two_phones(pcscf)
    ran = cli("show", *target, "--json")
    assert ran.code == 0 and [c["id"] for c in ran.json["contacts"]] == [1]


def test_show_json_has_the_4_sas_and_4_policies_as_the_kernel_has_them(pcscf, cli):
    pcscf.registered()
    ran = cli("show", AOR, "--json")
    conforms(ran.json, SHOW)
    t = ran.json["contacts"][0]["tunnel"]
    flows = {(r["sa"], r["src"], r["sport"], r["dst"], r["dport"], r["spi"]) for r in t["sas"]}
    assert flows == {("SA1", UE, 31000, PCSCF, 5200, 4097), ("SA2", PCSCF, 5200, UE, 31000, 1111),
                     ("SA3", PCSCF, 5100, UE, 31001, 2222), ("SA4", UE, 31001, PCSCF, 5100, 4096)}
    assert {(r["auth"], r["crypt"], r["aead"]) for r in t["sas"]} == {("hmac(sha1)", "cbc(aes)",
                                                                        None)}
    assert all(r["present"] and r["packets"] == 0 and r["integrity_failed"] == 0
               for r in t["sas"])
    assert [(r["sa"], r["dir"]) for r in t["policies"]] == [
        ("SA1", "in"), ("SA2", "out"), ("SA3", "out"), ("SA4", "in")]
    assert all(r["present"] and r["index"] is not None for r in t["policies"])


def test_show_marks_missing_and_different_pieces(pcscf, cli):
    pcscf.registered()
    key = first_sa_of(pcscf, 2222)
    pcscf.kernel.sas[key] = pcscf.kernel.sas[key].__class__(
        **{**{f: getattr(pcscf.kernel.sas[key], f) for f in pcscf.kernel.sas[key].__slots__},
           "auth": "hmac(md5)"})
    del pcscf.kernel.sas[first_sa_of(pcscf, 4097)]
    ran = cli("show", AOR)
    lines = ran.out.splitlines()
    assert any(line.split()[0] == "SA1" and line.endswith("MISSING") for line in lines)
    assert any(line.split()[0] == "SA3" and line.endswith("DIFFERS") for line in lines)
    assert "SA3 SA: auth hmac(md5), expected hmac(sha1)" in ran.out


def test_show_of_unknown_phone_is_exit_6(pcscf, cli):
    pcscf.registered()
    assert cli("show", "carol@ims.example").code == 6
    assert cli("show", "10.9.9.9").code == 6
    assert cli("show", "--id", "99").code == 6


def test_show_a_contact_without_tunnel(pcscf, cli):
    from kemi.message import KsrMessage
    import KSR
    from scenario import DOMAIN, register
    KSR._load_request(register(), (UE, 5060, "udp"), (PCSCF, 5060))
    assert pcscf.module.save_pending(KsrMessage(), DOMAIN) == 1
    ran = cli("show", AOR)
    assert ran.code == 0 and "no tunnel" in ran.out


# -- stats -------------------------------------------------------------------------------------

def test_stats_counts_contacts_tunnels_leases_and_port_pairs(pcscf, cli):
    two_phones(pcscf)
    pcscf.module.store.lease("10.0.0.4")  # a bare lease: a worker between lease and stage
    ran = cli("stats", "--json")
    conforms(ran.json, STATS)
    s = ran.json
    assert s["contacts"] == {"total": 2, "pending": 1, "registered": 1, "expired": 0}
    assert s["tunnels"] == {"total": 3, "in_use": 1, "pending": 1, "unattached": 0,
                            "leased_only": 1}
    assert s["spi_pairs"] == {"first_spi": 4096, "total": 50, "used": 3, "free": 47}
    assert [(p["index"], p["port_pc"], p["port_ps"]) for p in s["port_pairs"]] == [
        (0, 5100, 5200), (1, 5101, 5201)]
    assert sum(p["tunnels"] for p in s["port_pairs"]) == 3
    assert s["kernel"] == {"sas": 8, "policies": 8}
    text = cli("stats").out
    assert "tunnels     3 (in use 1, pending 1, unattached 0, leased only 1)" in text
    assert "SPI pairs   3 of 50 used, 47 free (from SPI 4096)" in text


# -- doctor ------------------------------------------------------------------------------------

def test_doctor_on_a_healthy_p_cscf_exits_0(pcscf, cli):
    two_phones(pcscf)
    ran = cli("doctor", "--json")
    conforms(ran.json, DOCTOR)
    assert ran.code == 0, ran.out
    assert {f["severity"] for f in ran.json["findings"]} <= SEVERITIES
    assert {f["check"] for f in ran.json["findings"]} <= CHECKS
    assert {f["check"] for f in findings(ran, "ok")} == {"esp", "listen", "store", "drift"}
    assert ran.json["worst"] == "ok"
    assert pcscf.kernel.states(user=MARKER) and all(s.spi != 0x50524F42
                                                    for s in pcscf.kernel.states())


def test_doctor_probes_every_algorithm_pair_with_a_throwaway_sa(pcscf, cli):
    added = []
    pcscf.kernel.refuse = lambda r: added.append(r.what) if r.type == k.XFRM_MSG_NEWSA else None
    assert cli("doctor").code == 0
    assert len(added) == 8 and {sa.sel.user for sa in added} == {MARKER}
    assert pcscf.kernel.sas == {}  # all removed again


def test_doctor_reports_a_kernel_without_esp_with_exit_5(pcscf, cli):
    pcscf.kernel.refuse = lambda r: errno.EPROTONOSUPPORT if r.type == k.XFRM_MSG_NEWSA else None
    ran = cli("doctor", "--json")
    assert ran.code == 5
    (f,) = findings(ran, "problem", "esp")
    assert "cannot hold IPv4 ESP" in f["what"] and "modprobe esp4" in f["fix"]


def test_doctor_names_the_algorithms_the_kernel_lacks(pcscf, cli):
    pcscf.kernel.refuse = lambda r: (errno.ENOSYS if r.type == k.XFRM_MSG_NEWSA
                                     and r.what.algs.crypt is not None
                                     and r.what.algs.crypt.name == "cbc(des3_ede)" else None)
    ran = cli("doctor", "--json")
    assert ran.code == 1
    found = findings(ran, "problem", "algorithms")
    assert {f["what"].split()[1:3][0] for f in found} == {"alg=hmac-md5-96", "alg=hmac-sha-1-96"}
    assert all("ealg=des-ede3-cbc" in f["what"] and "cbc(des3_ede)" in f["what"]
               and "des3_ede" in f["fix"] for f in found)


def test_doctor_finds_a_missing_listen_socket(pcscf, cli):
    cli.bound.discard(("udp", PCSCF, 5201))
    ran = cli("doctor", "--json")
    assert ran.code == 1
    (f,) = findings(ran, "problem", "listen")
    assert f["what"] == f"udp {PCSCF}:5201 (protected server port) is not bound"
    assert [name for name, _ in cli.procs_read] == ["udp", "udp6", "tcp", "tcp6"]


def test_doctor_says_when_kamailio_is_not_listening_at_all(pcscf, cli):
    cli.bound.clear()
    (f,) = findings(cli("doctor", "--json"), "problem", "listen")
    assert f["what"].startswith("none of the 10 sockets") and "--netns" in f["fix"]


def test_doctor_accepts_a_wildcard_socket(pcscf, cli):
    cli.bound = {(p, "0.0.0.0", port) for p, _, port in cli.bound}
    assert cli("doctor").code == 0


def test_doctor_finds_a_tunnel_missing_from_the_kernel(pcscf, cli):
    pcscf.registered()
    del pcscf.kernel.sas[first_sa_of(pcscf, 1111)]
    ran = cli("doctor", "--json")
    assert ran.code == 1
    (f,) = findings(ran, "problem", "drift")
    assert f["what"] == (f"contact 1 {AOR} ({UE}): tunnel in use spi-c=4096: missing from the "
                         f"kernel: SA2 spi 1111 {PCSCF}:5200 -> {UE}:31000")
    assert f["fix"].startswith("ims-ipsec drop --id 1 ")


def test_doctor_finds_a_policy_missing_and_an_sa_changed(pcscf, cli):
    pcscf.registered()
    pol = next(key for key, p in pcscf.kernel.policies_by_id.items() if p.sel.dport == 31001)
    del pcscf.kernel.policies_by_id[pol]
    key = first_sa_of(pcscf, 4096)
    sa = pcscf.kernel.sas[key]
    pcscf.kernel.sas[key] = sa.__class__(**{**{f: getattr(sa, f) for f in sa.__slots__},
                                            "reqid": 7})
    (f,) = findings(cli("doctor", "--json"), "problem", "drift")
    assert f"SA3 policy out {PCSCF}:5100 -> {UE}:31001" in f["what"]
    assert "different in the kernel: SA4 spi 4096" in f["what"] and "reqid 7, expected 4096" in f["what"]


def test_doctor_finds_entries_with_our_marker_no_tunnel_explains(pcscf, cli):
    pcscf.registered()
    stray = tunnel.Tunnel(PCSCF, "10.0.0.7", 5100, 5200, 41000, 41001, 9000, 9001, 77, 78,
                          "hmac-md5-96", "null", bytes(16), bytes(16))
    tunnel.install(pcscf.kernel, stray)
    foreign = tunnel.Tunnel(PCSCF, "10.0.0.8", 5100, 5200, 41000, 41001, 9100, 9101, 77, 78,
                            "hmac-md5-96", "null", bytes(16), bytes(16), marker=OTHER_MARKER)
    tunnel.install(pcscf.kernel, foreign)  # not ours: never reported
    ran = cli("doctor", "--json")
    assert ran.code == 1
    drift = findings(ran, "problem", "drift")
    assert len(drift) == 8 and all("10.0.0.8" not in f["what"] for f in drift)
    sa_fix = {f["fix"].split(";")[0] for f in drift if f["what"].startswith("SA ")}
    assert f"ip xfrm state delete src {PCSCF} dst 10.0.0.7 proto esp spi 0x4d" in sa_fix
    pol_fix = [f["fix"] for f in drift if f["what"].startswith("policy ")]
    assert len(pol_fix) == 4 and all(f.startswith("ip xfrm policy delete index ") for f in pol_fix)


def test_doctor_stray_fix_names_the_namespace(pcscf, cli):
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    pcscf.kernel.batch([new_sa(SA(PCSCF, "10.0.0.7", 0x99, Selector(PCSCF, "10.0.0.7",
                                                                            user=MARKER), algs))])
    (f,) = findings(cli("doctor", "--netns", "pcscf", "--json"), "problem", "drift")
    assert f["fix"].startswith(f"ip -n pcscf xfrm state delete src {PCSCF} dst 10.0.0.7 ")
    assert {ns for _, ns in cli.procs_read} == {"pcscf"}


def test_doctor_does_not_report_drift_that_is_gone_at_the_second_look(pcscf, cli):
    """A tunnel being installed or removed while the doctor looks is not drift."""
    pcscf.registered()
    key = first_sa_of(pcscf, 1111)
    sa = pcscf.kernel.sas.pop(key)
    cli.between_looks = lambda: pcscf.kernel.sas.__setitem__(key, sa)
    ran = cli("doctor", "--json")
    assert ran.code == 0 and not findings(ran, "problem")
    assert findings(ran, "ok", "drift")[0]["what"].startswith("store and kernel agree: 1 live")


def test_doctor_reports_only_drift_seen_at_both_looks(pcscf, cli):
    pcscf.registered()
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))

    def stray(spi: int) -> None:
        sa = SA(PCSCF, "10.0.0.7", spi, Selector(PCSCF, "10.0.0.7", user=MARKER), algs)
        assert pcscf.kernel.batch([new_sa(sa)]) == [None]

    stray(0x98)
    stray(0x99)
    cli.between_looks = lambda: (pcscf.kernel.sas.pop(("10.0.0.7", 0x98)), stray(0x97))
    ran = cli("doctor", "--json")
    assert [f["what"].split()[:3] for f in findings(ran, "problem")] == [["SA", "spi", "153"]]
    cli.between_looks = lambda: pcscf.kernel.sas.pop(("10.0.0.7", 0x99))
    ran = cli("doctor", "--json")
    assert ran.code == 1 and [f["what"].split()[2] for f in findings(ran, "problem")] == ["151"]
    pcscf.kernel.sas.pop(("10.0.0.7", 0x97))
    stray(0x96)
    cli.between_looks = lambda: (pcscf.kernel.sas.pop(("10.0.0.7", 0x96)), stray(0x95))
    ran = cli("doctor", "--json")
    assert ran.code == 0
    assert "being installed or removed" in findings(ran, "ok", "drift")[0]["what"]


def test_doctor_warns_of_leftovers_the_sweep_should_have_removed(pcscf, cli):
    pcscf.registered()
    pcscf.module.store.lease("10.0.0.4")
    pcscf.clock.advance(3600)
    ran = cli("doctor", "--json")
    assert ran.code == 0  # warnings only
    sweep = findings(ran, "warning", "sweep")
    assert any("1 contact(s) past their expiry" in f["what"] for f in sweep)
    assert any(f["what"].startswith("lease spi-c=4098") for f in sweep)
    assert all("rtimer" in f["fix"] for f in sweep)


def test_doctor_warns_when_the_store_has_other_parameters(pcscf, cli):
    pcscf.registered()
    cli.defines["IPSEC_SPI_ID_START"] = "20000"
    (f,) = findings(cli("doctor", "--json"), "warning", "params")
    assert "outside the parameters given here" in f["what"]


def test_doctor_warns_of_a_store_readable_by_others(pcscf, cli):
    os.chmod(pcscf.module.store.path, 0o644)
    (f,) = findings(cli("doctor", "--json"), "warning", "store")
    assert "0644" in f["what"] and f["fix"] == f"chmod 600 {pcscf.module.store.path}"


def test_doctor_without_store_still_checks_the_rest_and_exits_3(tmp_path, pcscf, cli):
    cli.defines["IPSEC_STORE"] = f'"{tmp_path / "none.sqlite"}"'
    ran = cli("doctor", "--json")
    assert ran.code == 3
    assert {f["check"] for f in findings(ran, "ok")} == {"esp", "listen"}
    assert "does not exist" in findings(ran, "problem", "store")[0]["what"]


def test_doctor_text_prints_each_finding_and_its_fix(pcscf, cli):
    cli.bound.discard(("tcp", PCSCF, 5100))
    out = cli("doctor").out.splitlines()
    i = out.index(f"problem  listen     tcp {PCSCF}:5100 (protected client port) is not bound")
    assert out[i + 1].lstrip().startswith("fix: Kamailio binds the protected ports")
    assert out[-1] == "doctor: 1 problem(s), 0 warning(s)"


# -- drop -------------------------------------------------------------------------------------

def test_drop_removes_one_phones_tunnel_from_kernel_store_and_leases(pcscf, cli):
    two_phones(pcscf)
    bob_sas = {key for key, sa in pcscf.kernel.sas.items() if BOB_UE in (sa.src, sa.dst)}
    ran = cli("drop", "alice@ims.example", "--json")
    assert ran.code == 0
    conforms(ran.json, DROP)
    assert [c["aor"] for c in ran.json["dropped"]] == [AOR]
    assert (ran.json["tunnels"], ran.json["pieces_removed"], ran.json["leases_released"]) == (
        1, 8, 1)
    assert set(pcscf.kernel.sas) == bob_sas and len(pcscf.kernel.policies_by_id) == 4
    store = pcscf.module.store
    assert store.find_by_aor(AOR) == [] and [c.aor for c in store.contacts_matching()] == [BOB]
    assert [r.lease.spi_pc for r, _ in store.leases_with_age()] == [4098]
    assert cli("doctor").code == 0  # nothing left over


def test_drop_by_ip_counts_pieces_already_gone(pcscf, cli):
    pcscf.registered()
    del pcscf.kernel.sas[first_sa_of(pcscf, 2222)]
    ran = cli("drop", UE)
    assert ran.code == 0 and pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    assert ran.out.splitlines() == [
        f"dropped contact 1 {AOR} (udp {UE}:5060)",
        "1 tunnel(s): 7 SA(s)/policy(ies) removed from the kernel, 1 already gone; "
        "1 lease(s) released"]


def test_drop_of_unknown_phone_is_exit_6_and_removes_nothing(pcscf, cli):
    pcscf.registered()
    assert cli("drop", "carol@ims.example").code == 6
    assert len(pcscf.kernel.sas) == 4 and pcscf.module.store.find_by_aor(AOR)


# -- flush ------------------------------------------------------------------------------------

def foreign_tunnel(p: Pcscf) -> None:
    tunnel.install(p.kernel, tunnel.Tunnel(PCSCF, "10.0.0.8", 5100, 5200, 41000, 41001, 9100,
                                           9101, 77, 78, "hmac-md5-96", "null", bytes(16),
                                           bytes(16), marker=OTHER_MARKER))


@pytest.mark.parametrize("answer", ["", "no\n", "y\n"])
def test_flush_asks_and_does_nothing_unless_told_yes(pcscf, cli, answer):
    two_phones(pcscf)
    cli.stdin = answer
    ran = cli("flush")
    assert ran.code == 7 and "not confirmed" in ran.err
    assert "This removes 2 contact(s)" in ran.err and "8 SA(s) and 8 policy(ies)" in ran.err
    assert len(pcscf.kernel.sas) == 8 and len(pcscf.module.store.contacts_matching()) == 2


def test_flush_removes_everything_of_ours_and_nothing_else(pcscf, cli):
    two_phones(pcscf)
    pcscf.module.store.lease("10.0.0.4")
    foreign_tunnel(pcscf)
    cli.stdin = "yes\n"
    ran = cli("flush", "--json")
    assert ran.code == 0
    conforms(ran.json, FLUSH)
    assert ran.json == {"contacts": 2, "sas": 8, "policies": 8, "leases_released": 3}
    assert {s.sel.user for s in pcscf.kernel.states()} == {OTHER_MARKER}
    assert len(pcscf.kernel.states()) == 4 and len(pcscf.kernel.policies()) == 4
    store = pcscf.module.store
    assert store.contacts_matching() == [] and store.leases_with_age() == []
    assert pcscf.registered()  # the P-CSCF goes on serving


def test_flush_of_many_shows_progress_on_a_terminal(pcscf, cli):
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    requests = []
    for i in range(1250):  # 5,000 SAs and 5,000 policies
        t = tunnel.Tunnel(PCSCF, f"10.1.{i // 250}.{i % 250 + 1}", 5100, 5200, 41000, 41001,
                          10000 + 2 * i, 10001 + 2 * i, 77, 78, "hmac-md5-96", "null",
                          bytes(16), bytes(16))
        requests += [new_sa(sa) for sa in tunnel.sas(t, algs)]
        requests += [new_policy(p) for p in tunnel.policies(t)]
    assert pcscf.kernel.batch(requests) == [None] * 10000
    cli.tty = True
    ran = cli("flush", "--yes")
    assert ran.code == 0 and pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    assert ran.out == "flushed: 0 contact(s), 5000 SA(s), 5000 policy(ies), 0 lease(s) released\n"
    steps = [s.split("\033")[0] for s in ran.err.split("\r") if s]
    assert steps == ["flush: 2,000 of 5,000 policies removed",
                     "flush: 4,000 of 5,000 policies removed",
                     "flush: 5,000 of 5,000 policies removed",
                     "flush: 2,000 of 5,000 SAs removed",
                     "flush: 4,000 of 5,000 SAs removed",
                     "flush: 5,000 of 5,000 SAs removed"]


def test_flush_counts_contacts_on_a_terminal_and_leaves_the_store_usable(pcscf, cli):
    two_phones(pcscf)
    cli.tty = True
    ran = cli("flush", "--yes")
    assert ran.code == 0 and "flush: 2 of 2 contacts removed" in ran.err
    assert ran.out == "flushed: 2 contact(s), 8 SA(s), 8 policy(ies), 2 lease(s) released\n"
    assert cli("doctor").code == 0 and cli("stats", "--json").json["spi_pairs"]["used"] == 0


def test_flush_without_terminal_prints_no_progress(pcscf, cli):
    pcscf.registered()
    ran = cli("flush", "--yes")
    assert ran.code == 0 and ran.err == ""


# -- the entry points ---------------------------------------------------------------------------

def test_python_m_ipsec_and_the_console_script(tmp_path):
    missing = str(tmp_path / "none.sqlite")
    done = subprocess.run([sys.executable, "-m", "ipsec", "--store", missing, "list"],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 3 and done.stderr.startswith(f"ims-ipsec: store {missing} ")
    script = Path(sys.executable).parent / "ims-ipsec"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "exit codes: 0 ok" in done.stdout


def test_drop_waits_for_the_worker_holding_the_phones_lock(pcscf, cli):
    """A worker renewing the tunnel's lifetime (or re-keying) holds the phone's lock; a drop
    in the middle of it would let its policy update add back a policy just removed."""
    pcscf.registered()
    store = pcscf.module.store
    inside = threading.Event()
    seen: list[bool] = []

    def worker() -> None:
        with pcscf.module.locks.held(UE):
            inside.set()
            time.sleep(0.3)
            seen.append(bool(Store(store.path, spi_start=4096, spi_range=1000,
                                   client_port=5100, server_port=5200,
                                   max_connections=10).find_by_aor(AOR)))

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(2)
    t0 = time.monotonic()
    ran = cli("drop", AOR)
    t.join()
    assert ran.code == 0 and ran.out.startswith("dropped contact 1")
    assert seen == [True]  # the contact was still there all the while the lock was held
    assert time.monotonic() - t0 >= 0.2
    assert pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
