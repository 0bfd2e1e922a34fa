"""The kernel's XFRM netlink structs and attribute numbers (include/uapi/linux/xfrm.h).

One class per kernel struct, named as in the header, declared the pyroute2 way (`fields`,
`nla_map`). Structs embedded in other structs (`xfrm_selector` inside `xfrm_usersa_info`...)
follow pyroute2's field-type protocol (`decode_from`/`encode_into`), so pyroute2 itself can
decode our messages (the unit tests use that as an independent check of our encoder).
Messages and attributes are `nlmsg`/`nla` classes.

Every class also carries `struct`, a precompiled `struct.Struct` of its flattened layout: the
hot path packs with it directly, because pyroute2's dict-based encoder costs tens of
microseconds per message. Layouts use standard sizes with explicit padding (`=`), so sizes
equal the kernel's x86-64 sizes (checked by tests/unit/test_xfrm_encode.py).
"""
from __future__ import annotations

import struct
from typing import Any

from pyroute2.netlink import NETLINK_XFRM, nla, nlmsg

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A

XFRM_MODE_TRANSPORT = 0
XFRM_POLICY_ALLOW = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
IPPROTO_ESP = 50

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # in an ACK: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1


def flat_format(fields: Any) -> str:
    """The struct format of a pyroute2 `fields` list, nested struct types flattened in place."""
    return "".join(fmt if isinstance(fmt, str) else fmt.fmt for _, fmt in fields)


def _is_pad(name: str) -> bool:
    return name.startswith("__")


class xfrm_struct:
    """An embedded kernel struct: pyroute2's field-type protocol plus a compiled Struct."""

    fields: tuple = ()
    fmt = ""
    struct = struct.Struct("")
    size = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.fmt = flat_format(cls.fields)
        cls.struct = struct.Struct("=" + cls.fmt)
        cls.size = cls.struct.size

    @classmethod
    def decode_from(cls, data: bytes, offset: int) -> tuple[dict, int]:
        out = {}
        for name, fmt in cls.fields:
            if isinstance(fmt, str):
                size = struct.calcsize("=" + fmt)
                if not _is_pad(name):
                    (out[name],) = struct.unpack_from("=" + fmt, data, offset)
                offset += size
            else:
                out[name], offset = fmt.decode_from(data, offset)
        return out, offset

    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: dict | None) -> int:
        data.extend(bytes(cls.size))
        cls._write(data, offset, value or {})
        return offset + cls.size

    @classmethod
    def _write(cls, data: bytearray, offset: int, value: dict) -> None:
        for name, fmt in cls.fields:
            if isinstance(fmt, str):
                if not _is_pad(name):
                    struct.pack_into("=" + fmt, data, offset, value.get(name, 0))
                offset += struct.calcsize("=" + fmt)
            else:
                fmt._write(data, offset, value.get(name) or {})
                offset += fmt.size


class xfrm_selector(xfrm_struct):
    # ports and masks are __be16: packed from socket.htons() values
    fields = (
        ("daddr", "16s"),
        ("saddr", "16s"),
        ("dport", "H"),
        ("dport_mask", "H"),
        ("sport", "H"),
        ("sport_mask", "H"),
        ("family", "H"),
        ("prefixlen_d", "B"),
        ("prefixlen_s", "B"),
        ("proto", "B"),
        ("__pad", "3x"),
        ("ifindex", "i"),
        ("user", "I"),
    )


class xfrm_id(xfrm_struct):
    fields = (("daddr", "16s"), ("spi", "I"), ("proto", "B"), ("__pad", "3x"))


class xfrm_lifetime_cfg(xfrm_struct):
    fields = (
        ("soft_byte_limit", "Q"),
        ("hard_byte_limit", "Q"),
        ("soft_packet_limit", "Q"),
        ("hard_packet_limit", "Q"),
        ("soft_add_expires_seconds", "Q"),
        ("hard_add_expires_seconds", "Q"),
        ("soft_use_expires_seconds", "Q"),
        ("hard_use_expires_seconds", "Q"),
    )


class xfrm_lifetime_cur(xfrm_struct):
    fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))


class xfrm_stats(xfrm_struct):
    fields = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


class xfrm_user_tmpl(xfrm_struct):
    fields = (
        ("id", xfrm_id),
        ("family", "H"),
        ("__pad1", "2x"),
        ("saddr", "16s"),
        ("reqid", "I"),
        ("mode", "B"),
        ("share", "B"),
        ("optional", "B"),
        ("__pad2", "x"),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
    )


class xfrm_userpolicy_type(xfrm_struct):
    fields = (
        ("type", "B"),
        ("__pad1", "x"),
        ("reserved1", "H"),
        ("reserved2", "B"),
        ("__pad2", "x"),
    )


class xfrm_mark(xfrm_struct):
    fields = (("v", "I"), ("m", "I"))


class xfrm_replay_state(xfrm_struct):
    fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class _struct_nla(nla):
    """An attribute whose payload is one struct: the attribute takes the struct's fields."""

    __slots__ = ()
    payload: type[xfrm_struct] = xfrm_struct

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.fields = cls.payload.fields


class xfrm_attrs:
    """The attribute classes and the number -> name map shared by SA and policy messages."""

    class xfrm_algo(nla):
        # alg_key[] follows; keys are written by the encoder and never decoded
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"))

    class xfrm_algo_auth(nla):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))

    class xfrm_algo_aead(nla):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))

    class xfrm_user_tmpl(_struct_nla):
        # XFRMA_TMPL holds 1..n templates back to back; pyroute2 decodes the first
        __slots__ = ()
        payload = xfrm_user_tmpl

    class xfrm_lifetime_cur(_struct_nla):
        __slots__ = ()
        payload = xfrm_lifetime_cur

    class xfrm_address_t(nla):
        __slots__ = ()
        fields = (("value", "16s"),)

    class xfrm_userpolicy_type(_struct_nla):
        __slots__ = ()
        payload = xfrm_userpolicy_type

    class xfrm_mark(_struct_nla):
        __slots__ = ()
        payload = xfrm_mark

    class xfrm_replay_state(_struct_nla):
        __slots__ = ()
        payload = xfrm_replay_state

    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (5, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (13, "XFRMA_SRCADDR", "xfrm_address_t"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
    )


XFRMA = {name: num for num, name, _ in xfrm_attrs.nla_map}


class _message(xfrm_attrs, nlmsg):
    """An XFRM netlink message: a fixed struct, then attributes (pyroute2 decodes both)."""

    __slots__ = ()
    struct = struct.Struct("")
    size = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.struct = struct.Struct("=" + flat_format(cls.fields))
        cls.size = cls.struct.size


class xfrm_usersa_info(_message):
    __slots__ = ()
    fields = (
        ("sel", xfrm_selector),
        ("id", xfrm_id),
        ("saddr", "16s"),
        ("lft", xfrm_lifetime_cfg),
        ("curlft", xfrm_lifetime_cur),
        ("stats", xfrm_stats),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad", "7x"),
    )


class xfrm_usersa_id(_message):
    __slots__ = ()
    fields = (("daddr", "16s"), ("spi", "I"), ("family", "H"), ("proto", "B"), ("__pad", "x"))


class xfrm_userpolicy_info(_message):
    __slots__ = ()
    fields = (
        ("sel", xfrm_selector),
        ("lft", xfrm_lifetime_cfg),
        ("curlft", xfrm_lifetime_cur),
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad", "4x"),
    )


class xfrm_userpolicy_id(_message):
    __slots__ = ()
    fields = (("sel", xfrm_selector), ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class nlmsghdr(xfrm_struct):
    fields = (
        ("length", "I"),
        ("type", "H"),
        ("flags", "H"),
        ("sequence_number", "I"),
        ("pid", "I"),
    )
