"""Sec-agree algorithm names -> Linux XFRM algorithms and ESP keys (3GPP TS 33.203 Annex I).

The phone offers `alg` (integrity) and `ealg` (encryption) by their 3GPP names; the kernel wants
its crypto API names and the ESP keys derived from the AKA keys CK and IK. Pure functions.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

AUTH_ALGS = ("hmac-md5-96", "hmac-sha-1-96", "aes-gmac", "null")
ENC_ALGS = ("null", "aes-cbc", "des-ede3-cbc", "aes-gcm")

# The combinations a P-CSCF can install: an HMAC with any classic cipher, or one of the two
# AES-GCM based AEADs alone (integrity-only GMAC, or GCM which covers both).
VALID_PAIRS = frozenset(
    [(a, e) for a in ("hmac-md5-96", "hmac-sha-1-96") for e in ("null", "aes-cbc", "des-ede3-cbc")]
    + [("aes-gmac", "null"), ("null", "aes-gcm")]
)


class AlgorithmError(ValueError):
    """An algorithm name or pair this module cannot serve, or keys of the wrong size."""


@dataclass(frozen=True)
class KernelAlg:
    """One XFRM algorithm attribute: crypto API name, key, and ICV length for auth/AEAD."""

    name: str
    key: bytes
    icv_bits: int = 0

    def __repr__(self) -> str:  # keys never reach a log line through repr()
        return f"KernelAlg(name={self.name!r}, key=<{len(self.key)} bytes>, icv_bits={self.icv_bits})"


@dataclass(frozen=True)
class EspAlgs:
    """What one SA carries: auth + crypt (classic ESP) or aead alone."""

    auth: KernelAlg | None = None
    crypt: KernelAlg | None = None
    aead: KernelAlg | None = None


def is_valid_pair(alg: str, ealg: str) -> bool:
    return (alg, ealg) in VALID_PAIRS


def kdf_33220(key: bytes, fc: int, *params: bytes) -> bytes:
    """TS 33.220 Annex B.2 KDF: HMAC-SHA-256(key, FC || P0 || L0 || P1 || L1 ...)."""
    s = bytes([fc])
    for p in params:
        s += p + len(p).to_bytes(2, "big")
    return hmac.new(key, s, hashlib.sha256).digest()


def gcm_salt(ck: bytes, ik: bytes, gmac: bool) -> bytes:
    """The 32-bit salt for aes-gcm (FC 0x59) or aes-gmac (FC 0x58): the KDF's last 4 bytes."""
    fc, p0 = (0x58, b"AES_GMAC_SALT") if gmac else (0x59, b"AES_GCM_SALT")
    return kdf_33220(ck + ik, fc, p0)[-4:]


def esp_algs(alg: str, ealg: str, ck: bytes, ik: bytes) -> EspAlgs:
    """The kernel algorithms and keys of an SA negotiated as (alg, ealg) with AKA keys CK, IK."""
    if len(ck) != 16 or len(ik) != 16:
        raise AlgorithmError("CK and IK must be 128 bits each")
    if alg not in AUTH_ALGS:
        raise AlgorithmError(f"unknown alg {alg!r}")
    if ealg not in ENC_ALGS:
        raise AlgorithmError(f"unknown ealg {ealg!r}")
    if not is_valid_pair(alg, ealg):
        raise AlgorithmError(f"unsupported pair alg={alg} ealg={ealg}")
    if alg == "aes-gmac":
        return EspAlgs(aead=KernelAlg("rfc4543(gcm(aes))", ik + gcm_salt(ck, ik, gmac=True), 128))
    if ealg == "aes-gcm":
        return EspAlgs(aead=KernelAlg("rfc4106(gcm(aes))", ck + gcm_salt(ck, ik, gmac=False), 128))
    auth = (
        KernelAlg("hmac(md5)", ik, 96)
        if alg == "hmac-md5-96"
        else KernelAlg("hmac(sha1)", ik + bytes(4), 96)
    )
    if ealg == "aes-cbc":
        crypt = KernelAlg("cbc(aes)", ck)
    elif ealg == "des-ede3-cbc":
        crypt = KernelAlg("cbc(des3_ede)", ck + ck[:8])
    else:
        crypt = KernelAlg("ecb(cipher_null)", b"")
    return EspAlgs(auth=auth, crypt=crypt)
