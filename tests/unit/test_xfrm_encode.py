"""XFRM message bytes without a kernel: layouts equal the kernel's, and two decoders agree.

Sizes and offsets are those of include/uapi/linux/xfrm.h on x86-64 (checked with the C
compiler against the header: `sizeof`/`offsetof`). pyroute2's generic decoder, driven by our
struct classes, is an independent reading of what our fast encoder packs.
"""
from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsec.algorithms import VALID_PAIRS, esp_algs
from ipsec.tunnel import Tunnel
from ipsec.xfrm import (
    SA,
    Dir,
    Lifetime,
    Policy,
    PolicyId,
    SAId,
    Selector,
    Template,
    XfrmExists,
    XfrmNotFound,
    del_policy,
    del_sa,
    new_policy,
    new_sa,
)
from ipsec.xfrm import codec
from ipsec.xfrm import structs as k
from ipsec.xfrm.errors import xfrm_error

CK = bytes(range(16))
IK = bytes(range(100, 116))

KERNEL_SIZES = {
    k.xfrm_selector: 56,
    k.xfrm_id: 24,
    k.xfrm_lifetime_cfg: 64,
    k.xfrm_lifetime_cur: 32,
    k.xfrm_stats: 12,
    k.xfrm_user_tmpl: 64,
    k.xfrm_usersa_info: 224,
    k.xfrm_usersa_id: 24,
    k.xfrm_userpolicy_info: 168,
    k.xfrm_userpolicy_id: 64,
    k.xfrm_userpolicy_type: 6,
    k.xfrm_mark: 8,
    k.nlmsghdr: 16,
}


@pytest.mark.parametrize(("cls", "size"), KERNEL_SIZES.items(), ids=lambda c: getattr(c, "__name__", c))
def test_struct_sizes_equal_the_kernel(cls, size):
    assert cls.struct.size == size


def _message(req: codec.Request) -> bytearray:
    return bytearray(codec.HDR.pack(16 + len(req.body), req.type, req.flags, 1, 0) + req.body)


def _sa(src="10.0.0.1", dst="10.0.0.2", alg="hmac-sha-1-96", ealg="aes-cbc", **kw) -> SA:
    sel = Selector(src, dst, 5060, 6000, user=0x50435343)
    return SA(src, dst, 0xC0FFEE01, sel, esp_algs(alg, ealg, CK, IK), reqid=42, **kw)


def test_offsets_of_the_fields_the_kernel_reads():
    body = new_sa(_sa(lifetime=Lifetime(soft=30, hard=60))).body
    assert body[52:56] == struct.pack("=I", 0x50435343)  # sel.user
    assert body[32:34] == struct.pack("!H", 6000)  # sel.dport, network order
    assert body[36:38] == struct.pack("!H", 5060)  # sel.sport
    assert body[40:42] == struct.pack("=H", socket.AF_INET)  # sel.family
    assert body[56 + 16 : 56 + 20] == struct.pack("!I", 0xC0FFEE01)  # id.spi
    assert body[56 + 20] == 50  # id.proto = ESP
    assert body[96 + 32 : 96 + 48] == struct.pack("=QQ", 30, 60)  # lft add_expires
    assert body[208:212] == struct.pack("=I", 42)  # reqid
    assert body[212:217] == bytes([2, 0, 0, 32, 0])  # family (2 bytes), mode, replay_window, flags
    pol = new_policy(Policy(Selector("10.0.0.1", "10.0.0.2"), Dir.OUT,
                            Template("10.0.0.1", "10.0.0.2", reqid=9), priority=7)).body
    assert pol[152:156] == struct.pack("=I", 7) and pol[160] == 1  # priority, dir
    tmpl = pol[168 + 4 :]
    assert tmpl[28:32] == socket.inet_aton("10.0.0.1") and tmpl[44:48] == struct.pack("=I", 9)


@pytest.mark.parametrize(("alg", "ealg"), sorted(VALID_PAIRS))
def test_sa_decoded_by_pyroute2(alg, ealg):
    sa = _sa("2001:db8::1", "2001:db8::2", alg, ealg)
    m = k.xfrm_usersa_info(data=_message(new_sa(sa)))
    m.decode()
    assert m["sel"]["user"] == 0x50435343 and m["sel"]["family"] == socket.AF_INET6
    assert socket.ntohs(m["sel"]["sport"]) == 5060 and m["sel"]["sport_mask"] == 0xFFFF
    assert (m["sel"]["prefixlen_s"], m["sel"]["prefixlen_d"], m["sel"]["proto"]) == (128, 128, 0)
    assert socket.ntohl(m["id"]["spi"]) == 0xC0FFEE01 and m["reqid"] == 42
    assert m["lft"]["hard_byte_limit"] == k.XFRM_INF and m["lft"]["hard_add_expires_seconds"] == 0
    attrs = {a.name: a.value for a in m["attrs"]}
    algs = esp_algs(alg, ealg, CK, IK)
    if algs.aead:
        assert set(attrs) == {"XFRMA_ALG_AEAD"}
        assert attrs["XFRMA_ALG_AEAD"]["alg_icv_len"] == 128
        assert attrs["XFRMA_ALG_AEAD"]["alg_key_len"] == 160
    else:
        assert set(attrs) == {"XFRMA_ALG_AUTH_TRUNC", "XFRMA_ALG_CRYPT"}
        auth = attrs["XFRMA_ALG_AUTH_TRUNC"]
        assert auth["alg_name"].rstrip(b"\0").decode() == algs.auth.name
        assert (auth["alg_key_len"], auth["alg_trunc_len"]) == (len(algs.auth.key) * 8, 96)
        assert attrs["XFRMA_ALG_CRYPT"]["alg_key_len"] == len(algs.crypt.key) * 8


def test_policy_decoded_by_pyroute2():
    p = Policy(Selector("fd00::1", "fd00::2", 1, 2, user=5), Dir.IN,
               Template("fd00::2", "fd00::1", reqid=9), priority=3)
    m = k.xfrm_userpolicy_info(data=_message(new_policy(p)))
    m.decode()
    assert (m["sel"]["user"], m["priority"], m["dir"], m["action"]) == (5, 3, 0, 0)
    tmpl = m.get_attr("XFRMA_TMPL")
    assert (tmpl["reqid"], tmpl["mode"], tmpl["id"]["proto"], tmpl["family"]) == (9, 0, 50, 10)
    assert tmpl["aalgos"] == tmpl["ealgos"] == tmpl["calgos"] == 0xFFFFFFFF


def _canonical(addr: object) -> str:
    """The text form the kernel's bytes come back as (inet_ntop's, not ipaddress')."""
    fam = socket.AF_INET6 if ":" in str(addr) else socket.AF_INET
    return socket.inet_ntop(fam, socket.inet_pton(fam, str(addr)))


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
).map(lambda p: (_canonical(p[0]), _canonical(p[1])))
ports = st.integers(1, 65535)
u32 = st.integers(1, 2**32 - 1)


@given(addresses, ports, ports, u32, u32, st.sampled_from(sorted(VALID_PAIRS)))
def test_sa_round_trip(addrs, sport, dport, spi, user, pair):
    src, dst = addrs
    sa = SA(src, dst, spi, Selector(src, dst, sport, dport, user=user),
            esp_algs(*pair, CK, IK), reqid=spi)
    info = codec.decode_sa(memoryview(_message(new_sa(sa))), 16, 16 + len(new_sa(sa).body))
    assert (info.src, info.dst, info.spi, info.reqid, info.sel) == (src, dst, spi, spi, sa.sel)
    assert (info.proto, info.mode, info.replay_window, info.packets) == (50, 0, 32, 0)
    algs = sa.algs
    names = (info.aead,) if algs.aead else (info.auth, info.crypt)
    expected = (algs.aead.name,) if algs.aead else (algs.auth.name, algs.crypt.name)
    assert names == expected


@given(addresses, ports, ports, u32, st.sampled_from(list(Dir)), st.integers(0, 2**32 - 1))
def test_policy_round_trip(addrs, sport, dport, reqid, direction, priority):
    src, dst = addrs
    p = Policy(Selector(src, dst, sport, dport, user=reqid), direction,
               Template(src, dst, reqid=reqid), priority)
    body = new_policy(p).body
    info = codec.decode_policy(memoryview(_message(new_policy(p))), 16, 16 + len(body))
    assert (info.sel, info.dir, info.priority, info.templates) == (p.sel, direction, priority, (p.tmpl,))


def test_delete_requests():
    body = del_sa(SAId("2001:db8::5", 0x01020304)).body
    assert len(body) == 24
    assert body == socket.inet_pton(socket.AF_INET6, "2001:db8::5") + bytes([1, 2, 3, 4]) + struct.pack("=HBx", 10, 50)
    by_sel = del_policy(PolicyId(Dir.FWD, Selector("10.0.0.1", "10.0.0.2", 1, 2))).body
    assert len(by_sel) == 64 and by_sel[60] == 2
    assert by_sel[:56] == new_policy(Policy(Selector("10.0.0.1", "10.0.0.2", 1, 2), Dir.FWD,
                                            Template("10.0.0.1", "10.0.0.2", 1))).body[:56]
    by_index = del_policy(PolicyId(Dir.OUT, index=0x123)).body
    assert by_index == bytes(56) + struct.pack("=IB3x", 0x123, 1)


def _ack(err: int, text: str = "") -> bytearray:
    attrs = b""
    if text:
        payload = text.encode() + b"\0"
        attrs = struct.pack("=HH", 4 + len(payload), 1) + payload + bytes(-len(payload) & 3)
    body = struct.pack("=i", -err) + codec.HDR.pack(16, 0x10, 5, 7, 0) + attrs
    flags = k.NLM_F_ACK_TLVS if text else 0
    return bytearray(codec.HDR.pack(16 + len(body), k.NLMSG_ERROR, flags, 7, 0) + body)


def test_ack_and_extended_error_text():
    assert codec.ack_error(memoryview(_ack(0)), 0, len(_ack(0)), 0) == (0, "")
    msg = _ack(22, "Invalid mode")
    assert codec.ack_error(memoryview(msg), 0, len(msg), k.NLM_F_ACK_TLVS) == (22, "Invalid mode")


def test_errors_are_typed_and_name_the_object_not_the_keys():
    sa = _sa()
    e = xfrm_error("add", 17, sa)
    assert isinstance(e, XfrmExists) and e.errno == 17
    assert str(e).startswith("add SA esp spi 0xc0ffee01 10.0.0.1 -> 10.0.0.2")
    assert "EEXIST" in str(e) and "File exists" in str(e)
    assert isinstance(xfrm_error("delete", 3, SAId("10.0.0.2", 1)), XfrmNotFound)
    assert isinstance(xfrm_error("delete", 2, PolicyId(Dir.IN, index=8)), XfrmNotFound)
    for text in (str(e), repr(e), repr(sa), repr(new_sa(sa))):
        assert IK.hex() not in text and CK.hex() not in text and repr(IK) not in text


def test_tunnel_repr_hides_keys():
    t = Tunnel("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 5, 6, 7, 8, "hmac-md5-96", "null", CK, IK)
    assert "ck" not in repr(t) and repr(IK) not in repr(t)


def test_one_socket_per_process_opened_lazily_and_anew_after_a_fork():
    """Kamailio forks its workers after loading the script: no two processes may share a
    netlink socket (their ACKs would cross). Dumps work on any kernel with XFRM."""
    import os

    from ipsec.xfrm import Xfrm

    x = Xfrm()
    assert x._sock is None  # nothing opened until used
    x.count_policies(user=0x7E57)
    parent_port = x._sock.getsockname()[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            x.count_policies(user=0x7E57)
            os.write(write, str(x._sock.getsockname()[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    child_port = int(os.read(read, 64) or b"0")
    os.waitpid(pid, 0)
    assert child_port not in (0, parent_port)
    x.count_policies(user=0x7E57)
    assert x._sock.getsockname()[0] == parent_port  # the parent keeps its own
    x.close()
