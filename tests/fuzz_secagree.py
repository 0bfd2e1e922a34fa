"""Fuzz the sec-agree and WWW-Authenticate parsers: only SecAgreeError may come out.

Run: .venv/bin/python -m tests.fuzz_secagree [--count N] [--seconds S] [--seed X]
Throws random text and mutated real-phone headers at every parser, checks a few invariants
on what parses, and prints the count, the time, the slowest input's time and every finding
(an exception other than SecAgreeError, or a broken invariant). Exit status 1 on findings.
The keys in the WWW-Authenticate seeds are made up.
"""
from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from ipsec.secagree import (
    SecAgreeError,
    choose_offer,
    extract_ck_ik,
    format_security_server,
    parse_security_header,
    verify_matches,
)
from tests.unit.test_secagree_corpus import CORPUS

PHONE_SEEDS = [h for headers, _ in CORPUS.values() for h in headers] + [
    'digest;d-alg=md5;d-qop=auth-int;d-ver="0123456789abcdef0123456789abcdef"',
    "ipsec-3gpp;alg=null;ealg=aes-gcm;spi-c=0;spi-s=4294967295;port-c=0;port-s=65535;q=1.000",
    'ipsec-3gpp;x=[2001:db8::1];y="a\\"b";flag;alg=aes-gmac',
]
CHALLENGE_SEEDS = [
    'Digest realm="ims.mnc001.mcc001.3gppnetwork.org",nonce="3Q3wFd8bXh8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
    'algorithm=AKAv1-MD5,qop="auth,auth-int",ck="0123456789abcdef0123456789abcdef",'
    'ik="fedcba9876543210fedcba9876543210"',
    'Digest IK=FEDCBA9876543210FEDCBA9876543210 , realm="r",\r\n CK = "0123456789abcdef0123456789abcdef", '
    'nonce="ck=x", opaque="o"',
]
SENT = format_security_server("hmac-sha-1-96", "aes-cbc", 3000000000, 3000000001, 5062, 5063)
PREFERENCES = [("", ""), ("hmac-md5-96", ""), ("", "null"), ("hmac-sha-1-96", "aes-cbc")]
INTERESTING = [
    ";", "=", ",", '"', "\\", " ", "\t", "\r\n", "\r\n ", "\r", "\n", "\x00", "\x7f", "é", "\u0661",
    "\ud800", "[", "]", ":", "0", "9", "-", "_", "4294967296", "99999999999", "65536", "-1", "+1",
    "1_0", "0x1", "q=2", "ipsec-3gpp", "IPSEC-3GPP", "ck=", "ik=", ";spi-c=1", ";alg", ",,",
]
ALPHABET = "ipsec-3gpdgtlalkmor;=,\"\\ \t\r\n0123456789qé\x00[]:"


def _mutate(rng: random.Random, text: str, pool: list[str]) -> str:
    """One of a few structural or character mutations, applied one to four times."""
    for _ in range(rng.randint(1, 4)):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        op = rng.randrange(8)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + rng.choice(INTERESTING) + text[i:]
        elif op == 2:
            text = text[:j] + text[i:j] + text[j:]
        elif op == 3:
            text = text[:i] + text[i:j].swapcase() + text[j:]
        elif op == 4:
            other = rng.choice(pool)
            text = text[:i] + other[rng.randrange(len(other) + 1) :]
        elif op == 5:
            text = text[:i] + chr(rng.randrange(0x110000)) + text[j:]
        elif op == 6:
            text = text[:i] + text[i:j] * rng.randint(2, 50) + text[j:]
        else:
            text = text[:i]
    return text


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(60)))
    return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(30)))


def _check_security(value: str) -> None:
    """Every Security-* parser on one value; what parses must format and verify back."""
    for values in (value, value.split("\n")):
        try:
            offers = parse_security_header(values)
        except SecAgreeError:
            continue
        for alg, ealg in PREFERENCES:
            try:
                chosen = choose_offer(offers, alg, ealg)
            except SecAgreeError:
                continue
            sent = format_security_server(
                chosen.alg, chosen.ealg, chosen.spi_c, chosen.spi_s, chosen.port_c, chosen.port_s
            )
            assert parse_security_header(sent)[0].spi_c == chosen.spi_c, "format/parse"
            assert verify_matches(sent, sent), "verify of what we sent"
    assert verify_matches(value, SENT) in (True, False)


def _check_challenge(value: str) -> None:
    try:
        ck, ik, rest = extract_ck_ik(value)
    except SecAgreeError:
        return
    assert len(ck) == len(ik) == 16, "key length"
    assert len(rest) < len(value), "nothing removed"


def run(count: int, seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    findings: dict[str, str] = {}
    slowest, done, start = (0.0, ""), 0, time.monotonic()
    checks: list[tuple[Callable[[str], None], list[str]]] = [
        (_check_security, PHONE_SEEDS),
        (_check_challenge, CHALLENGE_SEEDS + PHONE_SEEDS[:2]),
    ]
    while done < count and time.monotonic() - start < seconds:
        check, pool = checks[done % 2]
        roll = rng.random()
        value = rng.choice(pool) if roll < 0.05 else _random_text(rng) if roll < 0.25 else _mutate(
            rng, rng.choice(pool), pool
        )
        t0 = time.perf_counter()
        try:
            check(value)
        except Exception as err:  # noqa: BLE001 - the point is to see anything escaping
            findings.setdefault(f"{check.__name__}: {type(err).__name__}: {err}"[:200], repr(value)[:300])
        slowest = max(slowest, (time.perf_counter() - t0, f"{len(value)} chars {repr(value)[:80]}"))
        done += 1
    elapsed = time.monotonic() - start
    print(f"{done} inputs in {elapsed:.1f} s (seed {seed}); slowest {slowest[0] * 1000:.1f} ms: {slowest[1]}")
    print(f"{len(findings)} findings")
    for what, example in findings.items():
        print(f"  {what}\n    input: {example}")
    return 1 if findings else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    raise SystemExit(run(args.count, args.seconds, args.seed))


if __name__ == "__main__":
    main()
