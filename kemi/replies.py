"""Replies that match no transaction: the core forwards them statelessly along their Via once
the KEMI reply route returns, and whatever that route left in them leaves with them.

A 401 from the S-CSCF that comes late (after fr_timer, or after a restart, when its REGISTER's
transaction is gone) still carries CK and IK in WWW-Authenticate: forwarded, it reaches the
phone in clear text on its unprotected port. Such a reply cannot be protected (ipsec_create
needs the transaction's REGISTER) and the phone has retried or given up by then: it is dropped.
So is any reply to a REGISTER without a transaction (none passes without the module's
handling) and any challenge (WWW-/Proxy-Authenticate: the S-CSCF may put keys in one in a form
no pattern foresees). Other stray replies (a 2xx to an INVITE retransmitted after its
transaction ended) go on as before.
"""
from __future__ import annotations

import re

import KSR

from ipsec.logtext import clean

# a ck or ik parameter anywhere in a challenge (a quoted "ck=" counts too: dropping is safe)
_KEYS = re.compile(r"(?:^|[\s,;])(?:ck|ik)\s*=", re.I)
CHALLENGES = ("WWW-Authenticate", "Proxy-Authenticate")


def carries_keys(msg) -> bool:
    return any(_KEYS.search(msg.header(name) or "") for name in CHALLENGES)


def stray_reply(msg, trusted) -> int:
    """The reply route: 1 lets the reply go on (TM, or the core's stateless forward); a reply
    that must not leave is dropped (KSR.set_drop) and 0 returned.

    A reply of a transaction keeps its keys only where ipsec_create takes them out: the
    WWW-Authenticate of a 401 to REGISTER. Anywhere else (a 200 or a 407 with ck=, a
    Proxy-Authenticate, another method's challenge) the header carrying them is removed."""
    cseq = (msg.first_header("CSeq") or "").split()
    method = cseq[1].upper() if len(cseq) > 1 else ""
    keys = carries_keys(msg)
    if KSR.tm.t_check_trans() > 0:
        if keys:
            _strip_keys(msg, method, keep_www=(method == "REGISTER" and msg.status() == 401))
        return 1
    challenged = any(msg.header(name) is not None for name in CHALLENGES)
    if method != "REGISTER" and not challenged:
        if trusted(msg):  # the core, or a phone through its SAs
            return 1
        # Kamailio would forward it along its Via, from the socket it came to: a sender on a
        # phone's address writing to a protected port could have any response sent to that
        # phone's protected port from ours, in cleartext (no SA pairs those ports)
        KSR.info("ims-ipsec: %s to %s from %s matches no transaction and comes neither from"
                 " the core nor through a phone's SAs: dropped\n"
                 % (msg.status(), clean(method or "?"), msg.source()))
        drop()
        return 0
    KSR.info("ims-ipsec: %s to %s from %s matches no transaction: dropped%s\n"
             % (msg.status(), clean(method or "?"), msg.source(),
                ", its challenge carries CK/IK" if keys else ""))
    drop()
    return 0


def _strip_keys(msg, method: str, keep_www: bool) -> None:
    for name in CHALLENGES:
        if name == "WWW-Authenticate" and keep_www:
            continue
        if _KEYS.search(msg.header(name) or ""):
            msg.remove_header(name)
            KSR.info("ims-ipsec: %s to %s from %s: %s with CK/IK removed\n"
                     % (msg.status(), clean(method or "?"), msg.source(), name))


def drop() -> None:
    KSR.set_drop()  # core KEMI: DROP_R_F, the reply is not forwarded (5.6: no KSR.x.drop in Python)
