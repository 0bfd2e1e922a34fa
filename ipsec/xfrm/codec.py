"""Bytes of XFRM requests and of dump answers, packed with the structs' compiled layouts.

Encoding is on the hot path (a tunnel is 8 messages): every message is a few `Struct.pack`
calls and one join, with the constant parts (infinite lifetimes, zero counters) packed once.
"""
from __future__ import annotations

import socket
import struct
from typing import Any, NamedTuple

from ipsec.algorithms import EspAlgs

from . import structs as k
from .model import (
    SA,
    Dir,
    Lifetime,
    Policy,
    PolicyId,
    PolicyInfo,
    SAId,
    SAInfo,
    Selector,
    Template,
    family_of,
)

HDR = k.nlmsghdr.struct
NLA_HDR = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_U64 = struct.Struct("=Q")
_SEL = k.xfrm_selector.struct
_ID = k.xfrm_id.struct
_TMPL = k.xfrm_user_tmpl.struct
_SA_TAIL = struct.Struct("=" + k.flat_format(k.xfrm_usersa_info.fields[6:]))
_POLICY_TAIL = struct.Struct("=" + k.flat_format(k.xfrm_userpolicy_info.fields[3:]))
_USERSA_ID = k.xfrm_usersa_id.struct
_USERPOLICY_ID_TAIL = struct.Struct("=" + k.flat_format(k.xfrm_userpolicy_id.fields[1:]))
_ALGO = struct.Struct("=64sI")
_ALGO_AUTH = struct.Struct("=64sII")

_INFINITE = k.xfrm_lifetime_cfg.struct.pack(*[k.XFRM_INF] * 4, 0, 0, 0, 0)
_ZERO_CUR_STATS = bytes(k.xfrm_lifetime_cur.size + k.xfrm_stats.size)
_ZERO_CUR = bytes(k.xfrm_lifetime_cur.size)
_ALL_ALGS = 0xFFFFFFFF
_HOST_PREFIX = {socket.AF_INET: 32, socket.AF_INET6: 128}

REQUEST_ACK = k.NLM_F_REQUEST | k.NLM_F_ACK
_CREATE = REQUEST_ACK | k.NLM_F_CREATE | k.NLM_F_EXCL


class Request(NamedTuple):
    """One encoded request (header added at send time, with its sequence number).

    `what` names the object for error messages: its str() never contains keys.
    """

    op: str
    what: Any
    type: int
    flags: int
    body: bytes

    def __repr__(self) -> str:  # the body of an SA request holds its keys
        return f"Request({self.op} {self.what}, type={self.type}, {len(self.body)} bytes)"


def pack_addr(addr: str) -> bytes:
    return socket.inet_pton(family_of(addr), addr)


def _nla(attr_type: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return NLA_HDR.pack(size, attr_type) + payload + bytes(-size & 3)


def _selector(sel: Selector) -> bytes:
    fam = sel.family
    host = _HOST_PREFIX[fam]
    return _SEL.pack(
        pack_addr(sel.dst),
        pack_addr(sel.src),
        socket.htons(sel.dport),
        0xFFFF if sel.dport else 0,
        socket.htons(sel.sport),
        0xFFFF if sel.sport else 0,
        fam,
        host if sel.prefixlen_d is None else sel.prefixlen_d,
        host if sel.prefixlen_s is None else sel.prefixlen_s,
        sel.proto,
        0,
        sel.user,
    )


def _lifetime(lifetime: Lifetime | None) -> bytes:
    if lifetime is None:
        return _INFINITE
    return k.xfrm_lifetime_cfg.struct.pack(
        *[k.XFRM_INF] * 4, lifetime.soft, lifetime.hard, 0, 0
    )


def alg_attrs(algs: EspAlgs) -> bytes:
    """The algorithm attributes of an SA: AEAD alone, or truncated auth + crypt."""
    out = b""
    if algs.aead is not None:
        a = algs.aead
        head = _ALGO_AUTH.pack(a.name.encode(), len(a.key) * 8, a.icv_bits)
        out += _nla(k.XFRMA["XFRMA_ALG_AEAD"], head + a.key)
    if algs.auth is not None:
        a = algs.auth
        head = _ALGO_AUTH.pack(a.name.encode(), len(a.key) * 8, a.icv_bits)
        out += _nla(k.XFRMA["XFRMA_ALG_AUTH_TRUNC"], head + a.key)
    if algs.crypt is not None:
        a = algs.crypt
        out += _nla(k.XFRMA["XFRMA_ALG_CRYPT"], _ALGO.pack(a.name.encode(), len(a.key) * 8) + a.key)
    return out


def new_sa(sa: SA, algs: bytes | None = None) -> Request:
    """XFRM_MSG_NEWSA, exclusive: the kernel refuses a second SA with the same (dst, spi).

    `algs` lets a caller that adds several SAs with the same keys encode them once.
    """
    body = (
        _selector(sa.sel)
        + _ID.pack(pack_addr(sa.dst), socket.htonl(sa.spi), k.IPPROTO_ESP)
        + pack_addr(sa.src).ljust(16, b"\0")
        + _lifetime(sa.lifetime)
        + _ZERO_CUR_STATS
        + _SA_TAIL.pack(0, sa.reqid, sa.family, k.XFRM_MODE_TRANSPORT, sa.replay_window, 0)
        + (alg_attrs(sa.algs) if algs is None else algs)
    )
    return Request("add", sa, k.XFRM_MSG_NEWSA, _CREATE, body)


def update_sa(sa: SA, algs: bytes | None = None) -> Request:
    """XFRM_MSG_UPDSA: on an existing valid SA the kernel takes only the lifetime (and
    encapsulation, care-of address) from the message; its keys and algorithms must be well
    formed but are ignored (tests/kernel/test_lifetime_expiry.py). No such SA: ESRCH."""
    add = new_sa(sa, algs)
    return Request("update", sa, k.XFRM_MSG_UPDSA, REQUEST_ACK, add.body)


def get_sa(sa_id: SAId) -> Request:
    """XFRM_MSG_GETSA by destination and SPI: answered with the SA (an XFRM_MSG_NEWSA
    message with this request's sequence number), then the ACK."""
    body = _USERSA_ID.pack(
        pack_addr(sa_id.dst), socket.htonl(sa_id.spi), family_of(sa_id.dst), sa_id.proto
    )
    return Request("get", sa_id, k.XFRM_MSG_GETSA, REQUEST_ACK, body)


def del_sa(sa_id: SAId) -> Request:
    body = _USERSA_ID.pack(
        pack_addr(sa_id.dst), socket.htonl(sa_id.spi), family_of(sa_id.dst), sa_id.proto
    )
    return Request("delete", sa_id, k.XFRM_MSG_DELSA, REQUEST_ACK, body)


def _template(t: Template) -> bytes:
    return _TMPL.pack(
        pack_addr(t.dst),
        socket.htonl(t.spi),
        t.proto,
        family_of(t.dst),
        pack_addr(t.src),
        t.reqid,
        t.mode,
        0,
        0,
        _ALL_ALGS,
        _ALL_ALGS,
        _ALL_ALGS,
    )


def new_policy(policy: Policy) -> Request:
    """XFRM_MSG_NEWPOLICY, exclusive: the kernel refuses a second one with the same selector."""
    body = (
        _selector(policy.sel)
        + _lifetime(policy.lifetime)
        + _ZERO_CUR
        + _POLICY_TAIL.pack(policy.priority, 0, policy.dir, k.XFRM_POLICY_ALLOW, 0, 0)
        + _nla(k.XFRMA["XFRMA_TMPL"], _template(policy.tmpl))
    )
    return Request("add", policy, k.XFRM_MSG_NEWPOLICY, _CREATE, body)


def update_policy(policy: Policy) -> Request:
    """XFRM_MSG_UPDPOLICY: replaces the policy on the same selector and direction (keeping
    its index; the replacement's add_time is now), or adds it when there is none."""
    add = new_policy(policy)
    return Request("update", policy, k.XFRM_MSG_UPDPOLICY, REQUEST_ACK, add.body)


def del_policy(policy_id: PolicyId) -> Request:
    sel = _selector(policy_id.sel) if policy_id.sel is not None else bytes(_SEL.size)
    body = sel + _USERPOLICY_ID_TAIL.pack(policy_id.index, policy_id.dir)
    return Request("delete", policy_id, k.XFRM_MSG_DELPOLICY, REQUEST_ACK, body)


def get_policy(policy_id: PolicyId) -> Request:
    """XFRM_MSG_GETPOLICY by selector and direction: the kernel answers with the policy
    (an XFRM_MSG_NEWPOLICY message with this request's sequence number), then the ACK."""
    body = _selector(policy_id.sel) + _USERPOLICY_ID_TAIL.pack(policy_id.index, policy_id.dir)
    return Request("get", policy_id, k.XFRM_MSG_GETPOLICY, REQUEST_ACK, body)


def dump_request(msg_type: int, seq: int) -> bytes:
    return HDR.pack(HDR.size, msg_type, k.NLM_F_REQUEST | k.NLM_F_DUMP, seq, 0)


def _flat_index(fields: Any, prefix: str = "") -> dict[str, int]:
    """Position of each named field in the flattened unpack tuple ('sel.user' -> 11)."""
    names: list[str] = []

    def walk(fs: Any, pre: str) -> None:
        for name, fmt in fs:
            if not isinstance(fmt, str):
                walk(fmt.fields, f"{pre}{name}.")
            elif not fmt.endswith("x"):
                names.append(pre + name)

    walk(fields, prefix)
    return {n: i for i, n in enumerate(names)}


_SA_IX = _flat_index(k.xfrm_usersa_info.fields)
_POL_IX = _flat_index(k.xfrm_userpolicy_info.fields)
_SEL_USER_OFFSET = 52  # offsetof(struct xfrm_selector, user): lets a filter skip a full decode
_TMPL_IX = _flat_index(k.xfrm_user_tmpl.fields)


def _addr(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw if family == socket.AF_INET6 else raw[:4])


def _decode_selector(v: tuple, ix: dict[str, int], fallback_family: int) -> Selector:
    fam = v[ix["sel.family"]] or fallback_family
    host = _HOST_PREFIX.get(fam, 0)
    plen_s, plen_d = v[ix["sel.prefixlen_s"]], v[ix["sel.prefixlen_d"]]
    return Selector(
        src=_addr(fam, v[ix["sel.saddr"]]),
        dst=_addr(fam, v[ix["sel.daddr"]]),
        sport=socket.ntohs(v[ix["sel.sport"]]),
        dport=socket.ntohs(v[ix["sel.dport"]]),
        proto=v[ix["sel.proto"]],
        user=v[ix["sel.user"]],
        prefixlen_s=None if plen_s == host else plen_s,
        prefixlen_d=None if plen_d == host else plen_d,
    )


def _attrs(buf: memoryview, start: int, end: int) -> dict[int, memoryview]:
    out = {}
    while start + 4 <= end:
        size, attr_type = NLA_HDR.unpack_from(buf, start)
        if size < 4:
            break
        out[attr_type & NLA_TYPE_MASK] = buf[start + 4 : start + size]
        start += (size + 3) & ~3
    return out


def _alg_name(attrs: dict[int, memoryview], name: str) -> str | None:
    raw = attrs.get(k.XFRMA[name])
    return None if raw is None else bytes(raw[:64]).split(b"\0", 1)[0].decode()


def selector_user(buf: memoryview, offset: int) -> int:
    """The `user` marker of the selector that opens an SA or policy message payload."""
    return _U32.unpack_from(buf, offset + _SEL_USER_OFFSET)[0]


def decode_sa(buf: memoryview, offset: int, end: int) -> SAInfo:
    """An SAInfo from one XFRM_MSG_NEWSA payload (xfrm_usersa_info + attributes)."""
    v = k.xfrm_usersa_info.struct.unpack_from(buf, offset)
    ix = _SA_IX
    fam = v[ix["family"]]
    attrs = _attrs(buf, offset + k.xfrm_usersa_info.size, end)
    last = attrs.get(k.XFRMA["XFRMA_LASTUSED"])
    return SAInfo(
        src=_addr(fam, v[ix["saddr"]]),
        dst=_addr(fam, v[ix["id.daddr"]]),
        spi=socket.ntohl(v[ix["id.spi"]]),
        proto=v[ix["id.proto"]],
        mode=v[ix["mode"]],
        reqid=v[ix["reqid"]],
        replay_window=v[ix["replay_window"]],
        sel=_decode_selector(v, ix, fam),
        auth=_alg_name(attrs, "XFRMA_ALG_AUTH_TRUNC") or _alg_name(attrs, "XFRMA_ALG_AUTH"),
        crypt=_alg_name(attrs, "XFRMA_ALG_CRYPT"),
        aead=_alg_name(attrs, "XFRMA_ALG_AEAD"),
        bytes=v[ix["curlft.bytes"]],
        packets=v[ix["curlft.packets"]],
        add_time=v[ix["curlft.add_time"]],
        use_time=v[ix["curlft.use_time"]],
        last_used=None if last is None else _U64.unpack_from(last)[0],
        replay=v[ix["stats.replay"]],
        integrity_failed=v[ix["stats.integrity_failed"]],
        hard=_hard(v[ix["lft.hard_add_expires_seconds"]]),
    )


def _decode_templates(raw: memoryview | None) -> tuple[Template, ...]:
    if raw is None:
        return ()
    ix = _TMPL_IX
    out = []
    for off in range(0, len(raw) - _TMPL.size + 1, _TMPL.size):
        t = _TMPL.unpack_from(raw, off)
        fam = t[ix["family"]]
        out.append(
            Template(
                src=_addr(fam, t[ix["saddr"]]),
                dst=_addr(fam, t[ix["id.daddr"]]),
                reqid=t[ix["reqid"]],
                spi=socket.ntohl(t[ix["id.spi"]]),
                proto=t[ix["id.proto"]],
                mode=t[ix["mode"]],
            )
        )
    return tuple(out)


def decode_policy(buf: memoryview, offset: int, end: int) -> PolicyInfo:
    """A PolicyInfo from one XFRM_MSG_NEWPOLICY payload (xfrm_userpolicy_info + attributes)."""
    v = k.xfrm_userpolicy_info.struct.unpack_from(buf, offset)
    ix = _POL_IX
    attrs = _attrs(buf, offset + k.xfrm_userpolicy_info.size, end)
    return PolicyInfo(
        sel=_decode_selector(v, ix, socket.AF_INET),
        dir=Dir(v[ix["dir"]]),
        priority=v[ix["priority"]],
        index=v[ix["index"]],
        action=v[ix["action"]],
        templates=_decode_templates(attrs.get(k.XFRMA["XFRMA_TMPL"])),
        add_time=v[ix["curlft.add_time"]],
        use_time=v[ix["curlft.use_time"]],
        hard=_hard(v[ix["lft.hard_add_expires_seconds"]]),
    )


def _hard(seconds: int) -> int:
    return 0 if seconds == k.XFRM_INF else seconds


def ack_error(buf: memoryview, offset: int, length: int, flags: int) -> tuple[int, str]:
    """(errno, kernel's extended-ack text) of an NLMSG_ERROR message; errno 0 is an ACK."""
    err = -_I32.unpack_from(buf, offset + HDR.size)[0]
    detail = ""
    if err and flags & k.NLM_F_ACK_TLVS:
        # the socket has NETLINK_CAP_ACK: only the request's header is echoed back
        attrs = _attrs(buf, offset + HDR.size + 4 + HDR.size, offset + length)
        raw = attrs.get(k.NLMSGERR_ATTR_MSG)
        if raw is not None:
            detail = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    return err, detail
