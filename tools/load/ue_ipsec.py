"""The phone's half of IPsec: a USIM stand-in, the 33.203 Annex I keys, and its SAs as netlink
requests.

Written from the 3GPP tables, like the e2e phone (tests/kernel/esp_net.py `ip_algs`,
`ue_flows`), not from `ipsec/`: only the netlink encoders of `ipsec.xfrm` and the
`KernelAlg`/`EspAlgs` value types are shared, so a wrong key or flow in the module under test
shows up as packets the kernel drops, not as two copies of the same mistake.

The phone's tunnel is the P-CSCF's seen from the other end: the same 4 SAs (SPI chosen by the
receiver, reqid = SPI), policies with in and out swapped.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from functools import lru_cache

from ipsec.algorithms import EspAlgs, KernelAlg
from ipsec.xfrm import SA, Dir, Policy, PolicyId, Request, SAId, Selector, Template
from ipsec.xfrm import codec, del_policy, del_sa, new_policy

# Selector `user` of the phones' entries; the P-CSCF's namespace never sees it.
UE_MARKER = 0x4C4F4144  # "LOAD"
_HSS_SECRET = b"make-load: the HSS and every USIM share this"


# ---- AKA stand-in: the S-CSCF stub and the phones derive the same CK/IK from the nonce ----

@lru_cache(maxsize=None)
def _user_key(aor: str) -> bytes:
    return hashlib.sha256(_HSS_SECRET + aor.encode()).digest()


def aka(aor: str, nonce: bytes) -> tuple[bytes, bytes, str]:
    """(CK, IK, RES) for this user and challenge, as a USIM computes them from RAND.

    The stub puts CK/IK in its 401 for the P-CSCF; the phone, which never sees them, gets the
    same from the nonce that reaches it. RES proves to the stub that the phone read the nonce
    the P-CSCF relayed."""
    key = _user_key(aor)
    keys = hmac.digest(key, b"CKIK" + nonce, "sha256")
    res = hmac.digest(key, b"RES" + nonce, "sha256")[:16].hex()
    return keys[:16], keys[16:], res


# ---- 33.203 Annex I ----

def _salt(ck: bytes, ik: bytes, fc: int, label: bytes) -> bytes:
    """TS 33.220 Annex B KDF (key CK||IK, S = FC || P0 || L0), least significant 32 bits."""
    s = bytes([fc]) + label + len(label).to_bytes(2, "big")
    return hmac.new(ck + ik, s, hashlib.sha256).digest()[-4:]


_AUTH = {"hmac-md5-96": ("hmac(md5)", lambda ik: ik),
         "hmac-sha-1-96": ("hmac(sha1)", lambda ik: ik + bytes(4))}
_ENC = {"null": ("ecb(cipher_null)", lambda ck: b""),
        "aes-cbc": ("cbc(aes)", lambda ck: ck),
        "des-ede3-cbc": ("cbc(des3_ede)", lambda ck: ck + ck[:8])}


def ue_algs(alg: str, ealg: str, ck: bytes, ik: bytes) -> EspAlgs:
    """The kernel algorithms and ESP keys of a negotiated (alg, ealg) with CK, IK."""
    if alg == "aes-gmac":
        return EspAlgs(aead=KernelAlg("rfc4543(gcm(aes))", ik + _salt(ck, ik, 0x58, b"AES_GMAC_SALT"), 128))
    if ealg == "aes-gcm":
        return EspAlgs(aead=KernelAlg("rfc4106(gcm(aes))", ck + _salt(ck, ik, 0x59, b"AES_GCM_SALT"), 128))
    auth_name, auth_key = _AUTH[alg]
    enc_name, enc_key = _ENC[ealg]
    return EspAlgs(auth=KernelAlg(auth_name, auth_key(ik), 96), crypt=KernelAlg(enc_name, enc_key(ck)))


# ---- the phone's tunnel ----

@dataclass(frozen=True, slots=True)
class UeTunnel:
    """One SA set as the phone holds it (ports and SPIs named as in 33.203 7.1)."""

    pcscf: str
    ue: str
    port_pc: int
    port_ps: int
    port_uc: int
    port_us: int
    spi_pc: int
    spi_ps: int
    spi_uc: int
    spi_us: int
    alg: str
    ealg: str
    ck: bytes = field(repr=False)
    ik: bytes = field(repr=False)


def flows(t: UeTunnel) -> list[tuple[str, int, str, int, int, Dir]]:
    """(src, sport, dst, dport, spi, the phone's policy direction) of SA1..SA4."""
    return [
        (t.ue, t.port_uc, t.pcscf, t.port_ps, t.spi_ps, Dir.OUT),
        (t.pcscf, t.port_ps, t.ue, t.port_uc, t.spi_uc, Dir.IN),
        (t.pcscf, t.port_pc, t.ue, t.port_us, t.spi_us, Dir.IN),
        (t.ue, t.port_us, t.pcscf, t.port_pc, t.spi_pc, Dir.OUT),
    ]


def install_requests(t: UeTunnel) -> list[Request]:
    """The 4 SAs, then the 4 policies (in one batch the kernel takes them in this order, so no
    policy exists without its SA). Keys are encoded once for the four SAs."""
    algs = ue_algs(t.alg, t.ealg, t.ck, t.ik)
    attrs = codec.alg_attrs(algs)
    out = []
    pols = []
    for src, sport, dst, dport, spi, direction in flows(t):
        sel = Selector(src, dst, sport, dport, user=UE_MARKER)
        out.append(codec.new_sa(SA(src, dst, spi, sel, algs, reqid=spi), attrs))
        pols.append(new_policy(Policy(sel, direction, Template(src, dst, reqid=spi))))
    return out + pols


def drop_requests(t: UeTunnel) -> list[Request]:
    """The 4 policies, then the 4 SAs."""
    fl = flows(t)
    return ([del_policy(PolicyId(d, Selector(s, ds, sp, dp, user=UE_MARKER))) for s, sp, ds, dp, _, d in fl]
            + [del_sa(SAId(dst, spi)) for _, _, dst, _, spi, _ in fl])
