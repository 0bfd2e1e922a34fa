"""The identity the core is told (3GPP TS 24.229), applied to the message through KSR.

- A request through a phone's SAs asserts one of the identities registered through those SAs
  (5.2.6.3): the phone's P-Preferred-Identity when it is one of them, else the default (the
  first P-Associated-URI of its 200 OK). The P-CSCF inserts P-Asserted-Identity itself;
  whatever P-Asserted-Identity and P-Preferred-Identity the phone wrote are removed.
- A REGISTER's Authorization says whether it came through the SAs (5.2.2.1):
  `integrity-protected="yes"` when it did, `"no"` when it did not, whatever the phone wrote.

The decisions are `ipsec.identities` (pure); this file only reads and rewrites headers.
"""
from __future__ import annotations

import KSR

from ipsec import identities
from ipsec.store import Contact

PAI = "P-Asserted-Identity"
PPI = "P-Preferred-Identity"


def registered_identities(contact: Contact) -> tuple[str, ...]:
    """What a request through this contact's SAs may assert: its 200 OK's P-Associated-URI;
    for a registration stored before those were kept, its AoR; none before its 200 OK."""
    if contact.associated:
        return contact.associated
    return (contact.aor,) if contact.state == "registered" else ()


def assert_identity(msg, contact: Contact) -> bool:
    """Insert P-Asserted-Identity for a request from this contact's phone; False (and nothing
    changed) when no identity is registered through its SAs: the caller refuses it."""
    chosen = identities.asserted_identity(registered_identities(contact), msg.header(PPI))
    if chosen is None:
        KSR.info(f"ims-ipsec: contact {contact.id}: {msg.method()} from {msg.source().host}:"
                 f"{msg.source().port} refused: no identity registered through its SAs\n")
        return False
    for name in (PPI, PAI):
        if msg.header(name) is not None:
            msg.remove_header(name)
    msg.append_header(PAI, f"<{chosen}>")
    return True


def mark_integrity(msg, protected: bool) -> None:
    """Authorization's integrity-protected parameter, as the P-CSCF sets it for the S-CSCF.
    A REGISTER without Authorization is left so (the S-CSCF derives the private identity)."""
    value = msg.header("Authorization")
    if value is None:
        return
    parts = [p for p in _authorizations(msg) if p.strip()]
    mark = identities.PROTECTED if protected else identities.UNPROTECTED
    msg.remove_header("Authorization")
    for part in parts:
        msg.append_header("Authorization", identities.with_integrity_protected(part, mark))


def _authorizations(msg) -> list[str]:
    """Each Authorization header on its own (joined, their commas would be ambiguous)."""
    found, i = [], 0
    while True:
        value = KSR.pv.get(f"$(hdr(Authorization)[{i}])")
        if value is None:
            return found
        found.append(value)
        i += 1
