"""What a 401 to a REGISTER does to the phone's tunnels: a decision over plain values.

ipsec_create asks the store for the contact as it is now and the tunnels that already use the
phone's offered SPIs, and acts on `decide`'s answer, all in one store transaction under the
phone's lock (ipsec/module.py). Nothing here does I/O, so every rule is tested on its own.
The actions (KEEP, NEW, CLEAR, REFUSE) and `Decision` live with the store's records, which
carry them through `Store.challenge`.
"""
from __future__ import annotations

from ipsec.store.records import (CLEAR, KEEP, NEW, REFUSE, Contact, Decision, Tunnel, UeSide,
                                 keep_tunnel)


def decide(contact: Contact | None, clashes: list[tuple[Tunnel, bool]], ue: UeSide,
           keys_digest: bytes, txn: bytes, reuse_server_port: bool,
           known_contact: bool) -> Decision:
    """`contact`: the REGISTER's contact now (None: an unprotected REGISTER's first one, or,
    with `known_contact`, one that is gone); `clashes`: tunnels whose SAs to this phone use
    one of the offered SPIs, each with whether a contact uses it; `txn`: the REGISTER's
    transaction key (module._transaction_key)."""
    if contact is None and known_contact:
        return Decision(REFUSE, reason="the contact is gone (swept or de-registered meanwhile)")
    staged = contact.pending if contact is not None else None
    if staged is not None and staged.txn == txn:
        # A second 401 to the same REGISTER (the core answered TM's retransmission): TM relays
        # only the first, whose Security-Server the phone acts on; keep its SAs.
        if keep_tunnel(staged, ue, keys_digest, True):
            return Decision(KEEP, staged)
        return Decision(REFUSE, reason="a second challenge to one REGISTER with other keys or "
                                       "offer; the tunnel of the first stays")
    if staged is not None and older_register(txn, staged.txn):
        # The phone has moved on to a newer REGISTER, already challenged: this 401 is for a
        # transaction it abandoned, and must not replace the SAs the newer one offers.
        return Decision(REFUSE, reason="challenge to an earlier REGISTER than the one already "
                                       "challenged; ignored")
    if contact is not None:
        for t in (contact.tunnel, staged):
            if keep_tunnel(t, ue, keys_digest, reuse_server_port):
                return Decision(KEEP, t)
    for t, in_use in clashes:
        # the kernel holds one SA per (phone address, SPI): only one of the two can exist
        if in_use or staged is None or t.lease != staged.lease:
            whose = "in use" if in_use else "of another contact"
            return Decision(REFUSE, t, f"the phone's SAs clash with those of tunnel "
                                       f"spi-c={t.lease.spi_pc} {whose} (it must offer new "
                                       "SPIs, 33.203 7.4)")
        return Decision(CLEAR, t)  # the phone gave up on that challenge: its tunnel goes
    return Decision(NEW)


def older_register(txn: bytes, than: bytes) -> bool:
    """Was `txn` an earlier REGISTER of the same phone (same Call-ID, lower CSeq)? A phone
    that sent a new REGISTER has given up on the old one (RFC 3261 10.2.4: one at a time)."""
    return (len(txn) == len(than) == 16 and txn[:8] == than[:8]
            and int.from_bytes(txn[8:12], "big") < int.from_bytes(than[8:12], "big"))
