"""ipsec.challenge.decide, rule by rule, over plain records (no store, no kernel)."""
from __future__ import annotations

from ipsec.challenge import decide, older_register
from ipsec.sipuri import Address
from ipsec.store import Contact, Lease, Tunnel, UeSide
from ipsec.store.records import CLEAR, KEEP, NEW, REFUSE

KEYS, OTHER_KEYS = b"k" * 32, b"o" * 32
UE = UeSide("10.0.0.2", 1111, 2222, 31000, 31001)


def txn(call: int, cseq: int, via: int = 0) -> bytes:
    return bytes([call]) * 8 + cseq.to_bytes(4, "big") + bytes([via]) * 4


def tunnel(spi_pc: int, ue: UeSide = UE, keys: bytes = KEYS, t: bytes = b"") -> Tunnel:
    return Tunnel(Lease(spi_pc, spi_pc + 1, 5100, 5200), ue, "hmac-sha-1-96", "aes-cbc",
                  "10.0.0.1", keys, "offer", f"server-{spi_pc}", t)


def contact(current: Tunnel | None = None, pending: Tunnel | None = None) -> Contact:
    a = Address("10.0.0.2", 5060)
    return Contact(7, "sip:a@x", "sip:a@10.0.0.2", a, a, "pending", 0.0, current, pending)


def run(c, clashes=(), keys=KEYS, t=txn(1, 2), reuse=True, known=False):
    return decide(c, list(clashes), UE, keys, t, reuse, known)


def test_a_first_register_gets_a_new_tunnel():
    assert run(None).action == NEW


def test_a_contact_gone_meanwhile_is_refused():
    d = run(None, known=True)
    assert d.action == REFUSE and "gone" in d.reason


def test_a_second_401_to_one_register_keeps_its_tunnel_with_the_same_keys_only():
    staged = tunnel(4096, t=txn(1, 2))
    assert run(contact(pending=staged), reuse=False) == run(contact(pending=staged))
    assert run(contact(pending=staged)).tunnel == staged
    assert run(contact(pending=staged), keys=OTHER_KEYS).action == REFUSE


def test_a_401_to_an_earlier_register_than_the_one_challenged_is_refused():
    staged = tunnel(4096, ue=UeSide("10.0.0.2", 9, 10, 1, 2), t=txn(1, 5))
    assert run(contact(pending=staged), t=txn(1, 4)).action == REFUSE
    assert run(contact(pending=staged), t=txn(1, 6)).action == NEW
    assert run(contact(pending=staged), t=txn(2, 4)).action == NEW  # another Call-ID


def test_same_keys_and_offer_keep_the_tunnel_only_with_reuse():
    current = tunnel(4096)
    assert run(contact(current), t=txn(1, 3)) == run(contact(current), t=txn(1, 3))
    assert run(contact(current), t=txn(1, 3)).action == KEEP
    clash = [(current, True)]
    assert run(contact(current), clash, reuse=False).action == REFUSE


def test_the_offered_spis_of_the_unconfirmed_tunnel_clear_it_first():
    staged = tunnel(4096, keys=OTHER_KEYS, t=txn(1, 1))
    d = run(contact(pending=staged), [(staged, False)], t=txn(1, 2))
    assert (d.action, d.tunnel) == (CLEAR, staged)


def test_the_offered_spis_of_a_tunnel_in_use_or_of_another_contact_are_refused():
    in_use, foreign = tunnel(4096, keys=OTHER_KEYS), tunnel(4098, keys=OTHER_KEYS)
    d = run(contact(in_use), [(in_use, True)], t=txn(1, 3))
    assert d.action == REFUSE and "in use" in d.reason
    d = run(contact(), [(foreign, False)])
    assert d.action == REFUSE and "another contact" in d.reason


def test_older_register_needs_the_same_call_id_and_a_lower_cseq():
    assert older_register(txn(1, 1), txn(1, 2))
    assert not older_register(txn(1, 2), txn(1, 2)) and not older_register(txn(1, 3), txn(1, 2))
    assert not older_register(txn(2, 1), txn(1, 2)) and not older_register(b"", txn(1, 2))
