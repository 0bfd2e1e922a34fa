"""ipsec.algorithms against TS 33.203 Annex I and TS 33.220 Annex B, vectors built here.

The expected keys are assembled in each test from CK and IK by the spec's words, and the KDF
with stdlib hmac over the byte string S written out by hand, never by calling the code under test.
"""
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsec.algorithms import (
    AUTH_ALGS,
    ENC_ALGS,
    VALID_PAIRS,
    AlgorithmError,
    esp_algs,
    gcm_salt,
    is_valid_pair,
    kdf_33220,
)

# TS 35.208 test set 1 (Milenage): realistic AKA output.
CK = bytes.fromhex("b40ba9a3c58b2a05bbf0d987b21bf8cb")
IK = bytes.fromhex("f769bcd751044604127672711c6d3441")

# TS 33.220 B.2: S = FC || P0 || L0, L0 = length of P0 in two octets.
S_GCM = b"\x59" + b"AES_GCM_SALT" + b"\x00\x0c"
S_GMAC = b"\x58" + b"AES_GMAC_SALT" + b"\x00\x0d"
# "the 32 least significant bits" of the 256-bit output = its last four octets.
SALT_GCM = hmac.new(CK + IK, S_GCM, hashlib.sha256).digest()[28:32]
SALT_GMAC = hmac.new(CK + IK, S_GMAC, hashlib.sha256).digest()[28:32]


def test_the_names_3gpp_defines() -> None:
    assert set(AUTH_ALGS) == {"hmac-md5-96", "hmac-sha-1-96", "aes-gmac", "null"}
    assert set(ENC_ALGS) == {"null", "aes-cbc", "des-ede3-cbc", "aes-gcm"}


def test_valid_pairs_are_hmac_with_classic_ciphers_or_one_gcm_aead() -> None:
    assert VALID_PAIRS == {
        ("hmac-md5-96", "null"),
        ("hmac-md5-96", "aes-cbc"),
        ("hmac-md5-96", "des-ede3-cbc"),
        ("hmac-sha-1-96", "null"),
        ("hmac-sha-1-96", "aes-cbc"),
        ("hmac-sha-1-96", "des-ede3-cbc"),
        ("aes-gmac", "null"),
        ("null", "aes-gcm"),
    }
    for alg in AUTH_ALGS:
        for ealg in ENC_ALGS:
            assert is_valid_pair(alg, ealg) == ((alg, ealg) in VALID_PAIRS)


def test_kdf_is_hmac_sha256_over_fc_and_length_prefixed_params() -> None:
    key = bytes(range(32))
    s = b"\x10" + b"abc" + b"\x00\x03" + b"" + b"\x00\x00" + b"\x01" * 300 + b"\x01\x2c"
    expected = hmac.new(key, s, hashlib.sha256).digest()
    assert kdf_33220(key, 0x10, b"abc", b"", b"\x01" * 300) == expected


def test_gcm_and_gmac_salts() -> None:
    assert gcm_salt(CK, IK, gmac=False) == SALT_GCM
    assert gcm_salt(CK, IK, gmac=True) == SALT_GMAC
    assert SALT_GCM != SALT_GMAC


# (alg, ealg) -> expected (auth name, auth key, crypt name, crypt key) built from the table.
CLASSIC = {
    ("hmac-md5-96", "null"): ("hmac(md5)", IK, "ecb(cipher_null)", b""),
    ("hmac-md5-96", "aes-cbc"): ("hmac(md5)", IK, "cbc(aes)", CK),
    ("hmac-md5-96", "des-ede3-cbc"): ("hmac(md5)", IK, "cbc(des3_ede)", CK[:8] + CK[8:] + CK[:8]),
    ("hmac-sha-1-96", "null"): ("hmac(sha1)", IK + b"\0\0\0\0", "ecb(cipher_null)", b""),
    ("hmac-sha-1-96", "aes-cbc"): ("hmac(sha1)", IK + b"\0\0\0\0", "cbc(aes)", CK),
    ("hmac-sha-1-96", "des-ede3-cbc"): (
        "hmac(sha1)",
        IK + b"\0\0\0\0",
        "cbc(des3_ede)",
        CK[:8] + CK[8:] + CK[:8],
    ),
}


@pytest.mark.parametrize(("alg", "ealg"), sorted(CLASSIC))
def test_classic_esp(alg: str, ealg: str) -> None:
    auth_name, auth_key, crypt_name, crypt_key = CLASSIC[(alg, ealg)]
    algs = esp_algs(alg, ealg, CK, IK)
    assert algs.aead is None
    assert (algs.auth.name, algs.auth.key, algs.auth.icv_bits) == (auth_name, auth_key, 96)
    assert (algs.crypt.name, algs.crypt.key) == (crypt_name, crypt_key)


def test_des_ede3_key_is_ck1_ck2_ck1_not_padded_ck() -> None:
    key = esp_algs("hmac-sha-1-96", "des-ede3-cbc", CK, IK).crypt.key
    assert key.hex() == (
        "b40ba9a3c58b2a05" "bbf0d987b21bf8cb" "b40ba9a3c58b2a05"
    )


def test_sha1_key_is_ik_then_32_zero_bits() -> None:
    assert esp_algs("hmac-sha-1-96", "null", CK, IK).auth.key.hex() == (
        "f769bcd751044604127672711c6d3441" "00000000"
    )


def test_aes_gcm_is_rfc4106_aead_keyed_with_ck_and_salt() -> None:
    algs = esp_algs("null", "aes-gcm", CK, IK)
    assert algs.auth is None and algs.crypt is None
    assert (algs.aead.name, algs.aead.key, algs.aead.icv_bits) == (
        "rfc4106(gcm(aes))",
        CK + SALT_GCM,
        128,
    )


def test_aes_gmac_is_rfc4543_aead_keyed_with_ik_and_salt() -> None:
    algs = esp_algs("aes-gmac", "null", CK, IK)
    assert algs.auth is None and algs.crypt is None
    assert (algs.aead.name, algs.aead.key, algs.aead.icv_bits) == (
        "rfc4543(gcm(aes))",
        IK + SALT_GMAC,
        128,
    )


@pytest.mark.parametrize(
    ("alg", "ealg"),
    [
        ("hmac-md5-96", "aes-gcm"),
        ("aes-gmac", "aes-cbc"),
        ("null", "null"),
        ("null", "aes-cbc"),
        ("hmac-sha-256", "null"),
        ("hmac-sha-1-96", "aes-ctr"),
        ("HMAC-SHA-1-96", "null"),
        ("", "null"),
    ],
)
def test_pairs_we_cannot_serve(alg: str, ealg: str) -> None:
    with pytest.raises(AlgorithmError):
        esp_algs(alg, ealg, CK, IK)


@pytest.mark.parametrize(("ck", "ik"), [(CK[:15], IK), (CK, IK + b"\0"), (b"", b"")])
def test_keys_must_be_128_bits(ck: bytes, ik: bytes) -> None:
    with pytest.raises(AlgorithmError) as err:
        esp_algs("hmac-sha-1-96", "aes-cbc", ck, ik)
    assert CK.hex() not in str(err.value) and IK.hex() not in str(err.value)


@pytest.mark.parametrize(("alg", "ealg"), sorted(VALID_PAIRS))
def test_repr_never_shows_a_key(alg: str, ealg: str) -> None:
    text = repr(esp_algs(alg, ealg, CK, IK))
    for secret in (CK, IK, CK[:8], IK[:8]):
        assert secret.hex() not in text
        assert repr(secret)[2:-1] not in text


@settings(max_examples=50, deadline=None)
@given(ck=st.binary(min_size=16, max_size=16), ik=st.binary(min_size=16, max_size=16))
def test_key_sizes_for_any_keys(ck: bytes, ik: bytes) -> None:
    sizes = {
        pair: [len(a.key) for a in (algs.auth, algs.crypt, algs.aead) if a is not None]
        for pair in VALID_PAIRS
        for algs in [esp_algs(*pair, ck, ik)]
    }
    assert sizes[("hmac-md5-96", "aes-cbc")] == [16, 16]
    assert sizes[("hmac-sha-1-96", "des-ede3-cbc")] == [20, 24]
    assert sizes[("hmac-sha-1-96", "null")] == [20, 0]
    assert sizes[("null", "aes-gcm")] == [20]
    assert sizes[("aes-gmac", "null")] == [20]
    salt = hmac.new(ck + ik, S_GCM, hashlib.sha256).digest()[-4:]
    assert esp_algs("null", "aes-gcm", ck, ik).aead.key == ck + salt
