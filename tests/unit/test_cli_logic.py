"""The command line's logic without a P-CSCF: defines, /proc/net parsing, the ESP verdicts,
expected sockets, text rendering."""
from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cli_support import proc_text
from ipsec.cli import doctor, render
from ipsec.cli.config import DEFAULTS, Config, ConfigError, cfg_defines, defines_from, parse_define
from ipsec.params import Params

ROOT = Path(__file__).resolve().parents[2]


# -- defines -----------------------------------------------------------------------------------

def test_defaults_are_kamailio_cfg_defines():
    assert cfg_defines((ROOT / "kamailio.cfg").read_text()) == DEFAULTS


def test_store_path_as_the_p_cscf_computes_it():
    assert Config.build(defines_from(None, [])).store_path == "/var/run/kamailio/ipsec-pcscf.sqlite"
    for run_dir in ("/run/p", '"/run/p"'):
        config = Config.build(defines_from(None, [f"RUN_DIR={run_dir}"]))
        assert config.store_path == "/run/p/ipsec-pcscf.sqlite"
    both = defines_from(None, ["RUN_DIR=/run/p", 'IPSEC_STORE="/data/s.sqlite"'])
    assert Config.build(both).store_path == "/data/s.sqlite"
    assert Config.build(both, store="/x.sqlite").store_path == "/x.sqlite"


def test_config_takes_the_defines_kamailio_cfg_gives_the_p_cscf():
    c = Config.build(defines_from(None, ["PCSCF_IP6=[fd00::1]", "EXPIRY_GRACE=45",
                                         "IPSEC_LISTEN_ADDR6=fd00::1"]), netns="pc")
    assert c.sip_addrs == ("127.0.0.1", "fd00::1") and c.expiry_grace == 45.0
    assert c.params == Params(ipsec_listen_addr="127.0.0.1", ipsec_listen_addr6="fd00::1")
    assert c.netns == "pc" and c.marker == 0x50435343


@pytest.mark.parametrize("define", ["EXPIRY_GRACE=soon", "IPSEC_SPI_ID_RANGE=1",
                                    "IPSEC_LISTEN_ADDR=fd00::1"])
def test_bad_values_are_config_errors(define):
    with pytest.raises(ConfigError):
        Config.build(defines_from(None, [define]))


def test_define_options_like_kamailio_dash_a():
    assert parse_define("NAME") == ("NAME", "")
    assert parse_define('NEXT_HOP="sip:a=b"') == ("NEXT_HOP", '"sip:a=b"')
    with pytest.raises(ConfigError):
        parse_define("1X=2")


def test_cfg_defines_first_definition_wins_and_comments_do_not_count():
    text = ("# -A IPSEC_CLIENT_PORT=1\n#!define A 1\n#!ifndef A\n#!define A 2\n#!endif\n"
            "#!trydef B \"x y\"\n#!define C\n")
    assert cfg_defines(text) == {"A": "1", "B": '"x y"', "C": ""}


# -- /proc/net ----------------------------------------------------------------------------------

def test_parse_proc_net_reads_this_hosts_sockets():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
         socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening, \
         socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound_only:
        u.bind(("127.0.0.1", 0))
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        udp = doctor.parse_proc_net(Path("/proc/net/udp").read_text(), "udp")
        tcp = doctor.parse_proc_net(Path("/proc/net/tcp").read_text(), "tcp")
        assert ("udp", "127.0.0.1", u.getsockname()[1]) in udp
        assert ("tcp", "127.0.0.1", listening.getsockname()[1]) in tcp
        assert ("tcp", "127.0.0.1", bound_only.getsockname()[1]) not in tcp  # not listening


def test_parse_proc_net_reads_ipv6_sockets():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.bind(("::1", 0))
        udp6 = doctor.parse_proc_net(Path("/proc/net/udp6").read_text(), "udp")
        assert ("udp", "::1", u.getsockname()[1]) in udp6


@given(st.sets(st.tuples(st.sampled_from(["udp", "tcp"]), st.ip_addresses().map(str),
                         st.integers(1, 65535)), max_size=20))
def test_parse_proc_net_reads_what_the_kernel_prints(sockets):
    found = set()
    for name in ("udp", "udp6", "tcp", "tcp6"):
        found |= doctor.parse_proc_net(proc_text(sockets, name), name.rstrip("6"))
    assert found == sockets


# -- listen sockets -----------------------------------------------------------------------------

def test_expected_sockets_of_kamailio_cfg_defaults_count_a_shared_port_once():
    c = Config.build(defines_from(None, []))
    found = doctor.expected_sockets(c.params, c.sip_addrs, 5060)
    assert sorted((s.proto, s.port) for s in found) == sorted(
        (p, port) for p in ("udp", "tcp") for port in (5060, 5062, 5063, 5064))
    assert {s.role for s in found if s.port == 5063} == {"protected client port"}


def test_expected_sockets_include_the_core_socket():
    """kamailio.cfg binds CORE_IP:CORE_PORT (UDP and TCP) when CORE_IP is given: the doctor
    looks for it too (before, a core socket that failed to bind went unnoticed)."""
    c = Config.build(defines_from(None, ["CORE_IP=10.1.0.1", "CORE_PORT=5070"]))
    found = doctor.expected_sockets(c.params, c.sip_addrs, 5060, c.core)
    assert {(s.proto, s.host, s.port, s.role) for s in found if s.role == "core socket"} == {
        ("udp", "10.1.0.1", 5070, "core socket"), ("tcp", "10.1.0.1", 5070, "core socket")}
    assert Config.build(defines_from(None, [])).core is None
    with pytest.raises(ConfigError, match="CORE_PORT"):
        Config.build(defines_from(None, ["CORE_IP=10.1.0.1", "CORE_PORT=99999"]))


def test_expected_sockets_cover_both_families():
    p = Params(ipsec_listen_addr="10.0.0.1", ipsec_listen_addr6="[fd00::1]",
               ipsec_client_port=6000, ipsec_server_port=6100, ipsec_max_connections=1)
    found = {str(s) for s in doctor.expected_sockets(p, ["10.0.0.1", "fd00::1"], 5060)}
    assert found == {f"{proto} {hp}" for proto in ("udp", "tcp") for hp in (
        "10.0.0.1:5060", "[fd00::1]:5060", "10.0.0.1:6000", "10.0.0.1:6100",
        "[fd00::1]:6000", "[fd00::1]:6100")}


# -- ESP verdicts -------------------------------------------------------------------------------

def probes(fam: int, error=None, detail="", only=None) -> list[doctor.Probe]:
    return [doctor.Probe(fam, a, e, error if only in (None, (a, e)) else None, "refused", detail
                         if only in (None, (a, e)) else "") for a, e in doctor.probe_pairs()]


def test_esp_verdict_all_pairs_work():
    (f,) = doctor.esp_findings(probes(4))
    assert (f.check, f.severity) == ("esp", "ok") and "all 8 algorithm pairs" in f.what


def test_esp_verdict_no_esp_per_family():
    found = doctor.esp_findings(probes(4) + probes(6, errno.EPROTONOSUPPORT))
    assert [(f.check, f.severity) for f in found] == [("esp", "ok"), ("esp", "problem")]
    assert "IPv6" in found[1].what and "esp6" in found[1].fix and doctor.has_no_esp(found)


def test_esp_verdict_blames_the_algorithm_the_kernel_named():
    (f,) = doctor.esp_findings(probes(4, errno.ENOSYS, "Requested AEAD algorithm not found",
                                      only=("null", "aes-gcm")))
    assert f.check == "algorithms" and "rfc4106(gcm(aes))" in f.what
    assert f.fix.startswith("modprobe gcm ") and "CONFIG_CRYPTO_GCM" in f.fix
    (f,) = doctor.esp_findings(probes(4, errno.ENOSYS, "Requested AUTH algorithm not found",
                                      only=("hmac-md5-96", "aes-cbc")))
    assert f.what.endswith("needs kernel crypto hmac(md5)") and f.fix.startswith("modprobe md5 ")


# -- text ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "text"), [(600, "in 10m"), (-5, "5s ago"), (0, "in 0s"),
                                               (3725, "in 1h2m"), (90061, "in 1d1h")])
def test_duration(seconds, text):
    assert render.duration(seconds) == text


def test_table_aligns_columns_and_shows_none_as_dash():
    assert render.table(("A", "BB"), [(1, None), ("long", 2)]) == "A     BB\n1     -\nlong  2\n"
