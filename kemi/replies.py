"""Replies that match no transaction: the core forwards them statelessly along their Via once
the KEMI reply route returns, and whatever that route left in them leaves with them.

A 401 from the S-CSCF that comes late (after fr_timer, or after a restart, when its REGISTER's
transaction is gone) still carries CK and IK in WWW-Authenticate: forwarded, it reaches the
phone in clear text on its unprotected port. Such a reply cannot be protected (ipsec_create
needs the transaction's REGISTER) and the phone has retried or given up by then: it is dropped.
So is any reply to a REGISTER without a transaction (none passes without the module's
handling) and any challenge (WWW-/Proxy-Authenticate: the S-CSCF may put keys in one in a form
no pattern foresees). Other stray replies (a 2xx to an INVITE retransmitted after its
transaction ended) go on, but only where `stray_path` allows and through the SAs it picks.
"""
from __future__ import annotations

import re

import KSR

from ipsec import headers
from ipsec.counters import REPLIES_DROPPED
from ipsec.logtext import clean
from ipsec.module import Refused
from ipsec.sipuri import hostport

# a ck or ik parameter anywhere in a challenge (a quoted "ck=" counts too: dropping is safe)
_KEYS = re.compile(r"(?:^|[\s,;])(?:ck|ik)\s*=", re.I)
CHALLENGES = ("WWW-Authenticate", "Proxy-Authenticate")


def carries_keys(msg) -> bool:
    return any(_KEYS.search(msg.header(name) or "") for name in CHALLENGES)


def stray_path(msg, module, core) -> str | None:
    """Where a reply that matches no transaction may go: None when it may, its send socket
    set; else why not. The core forwards it to its second Via (headers.reply_next_hop), from
    the socket it came to unless one is set, so without this a phone could aim a response
    through its own SAs at another phone's protected port (the port pairs are shared: the
    other phone's SAs would protect it), and a reply from the core (a 2xx retransmitted after
    its INVITE's transaction ended) would reach the phone's protected port in cleartext.

    - Through a phone's SAs: only to the core (NEXT_HOP's host or addresses, or its
      registration's Service-Route hosts), from the core socket when there is one.
    - From the core: only to a phone's protected port, through that phone's SAs (from our
      port_pc to its port_us, from our port_ps to its port_uc)."""
    try:
        to = headers.reply_next_hop(msg.header("Via"))
    except headers.HeaderError as e:
        return str(e)
    contact = module.tunnel_contact(msg)  # None unless from a phone's port through its SAs
    if contact is not None:
        if not core.is_core_host(to.host, contact.service_route):
            return f"it comes from a phone and its next hop {hostport(to.host, to.port)} is not the core"
        core.send_to_core(f"sip:{hostport(to.host, to.port)};transport={to.proto}")
        return None
    # with one socket, a phone's request leaves for the core from the protected port it came
    # to, so the core's replies come back to that port: the source tells, not the socket
    if not core.from_core(msg):
        return "it comes neither from the core nor through a phone's SAs"
    contact = module.store.find_by_phone_port(to.host, to.port)
    if contact is None:
        return f"its next hop {hostport(to.host, to.port)} is no phone's protected port"
    t = contact.tunnel
    local = t.lease.port_pc if to.port == t.ue.port_us else t.lease.port_ps
    try:
        msg.set_send_socket(f"{to.proto}:{hostport(t.pcscf_host, local)}")
    except Refused as e:
        return str(e)
    return None


def wrong_sender(msg, module, core) -> str | None:
    """Why a reply of a transaction may not go on, or None. TM matches a reply by its branch
    alone, whoever sends it. A reply that reaches a protected port must come through a
    phone's SAs or from the core:
    - a request to a phone leaves from our protected client port (port_pc, named in our Via)
      through its SA3, and its replies come back through SA4: one that reaches a client port
      from anyone else (a stranger who read the request: with ealg=null anyone on the path
      can) would be taken as the phone's answer;
    - with one socket, a phone's request is relayed to the core from the server port it came
      to, and the core's replies come back there: from NEXT_HOP's addresses, or from a
      Service-Route host this cannot list (an in-dialog request's next hop), so on a server
      port only a sender on a phone's address is refused (a phone or a stranger beside it).
    The core may reply at a client port too (a phone's request through SA4 is relayed from
    port_pc)."""
    if not module.is_protected(msg):
        return None
    # the core first: no store look-up for the common case (the core's replies to what a
    # phone sent, which with one socket all come to a protected port)
    src = msg.source()
    if core.from_core(msg) or module.store.is_tunnel_flow(src.host, src.port, msg.local().port):
        return None
    if msg.local().port in module.params.client_ports:
        return "it comes to a protected client port, not through a phone's SAs, not from the core"
    if module.store.is_phone_host(src.host):
        return "it comes to a protected server port from a phone's address, not through its SAs"
    return None


def stray_reply(msg, routing) -> int:
    """The reply route: 1 lets the reply go on (TM, or the core's stateless forward); a reply
    that must not leave is dropped (KSR.set_drop) and 0 returned.

    A reply of a transaction keeps its keys only where ipsec_create takes them out: the
    WWW-Authenticate of a 401 to REGISTER. Anywhere else (a 200 or a 407 with ck=, a
    Proxy-Authenticate, another method's challenge) the header carrying them is removed."""
    cseq = (msg.first_header("CSeq") or "").split()
    method = cseq[1].upper() if len(cseq) > 1 else ""
    keys = carries_keys(msg)
    if KSR.tm.t_check_trans() > 0:
        why = wrong_sender(msg, routing.m, routing.core)
        if why is not None:
            KSR.info("ims-ipsec: %s to %s from %s for a transaction: dropped, %s\n"
                     % (msg.status(), clean(method or "?"), msg.source(), why))
            drop(routing)
            return 0
        if keys:
            _strip_keys(msg, method, keep_www=(method == "REGISTER" and msg.status() == 401))
        return 1
    challenged = any(msg.header(name) is not None for name in CHALLENGES)
    if method != "REGISTER" and not challenged:
        why = stray_path(msg, routing.m, routing.core)  # where it may go, if anywhere
        if why is None:
            return 1
        KSR.info("ims-ipsec: %s to %s from %s matches no transaction: dropped, %s\n"
                 % (msg.status(), clean(method or "?"), msg.source(), clean(why)))
        drop(routing)
        return 0
    KSR.info("ims-ipsec: %s to %s from %s matches no transaction: dropped%s\n"
             % (msg.status(), clean(method or "?"), msg.source(),
                ", its challenge carries CK/IK" if keys else ""))
    drop(routing)
    return 0


def _strip_keys(msg, method: str, keep_www: bool) -> None:
    for name in CHALLENGES:
        if name == "WWW-Authenticate" and keep_www:
            continue
        if _KEYS.search(msg.header(name) or ""):
            msg.remove_header(name)
            KSR.info("ims-ipsec: %s to %s from %s: %s with CK/IK removed\n"
                     % (msg.status(), clean(method or "?"), msg.source(), name))


def drop(routing=None) -> None:
    """`routing`: the reply route's Routing, whose module counts the drop (None: a reply
    route that failed, see kemi/pcscf.py)."""
    if routing is not None:
        routing.m.counters.count(REPLIES_DROPPED)
    KSR.set_drop()  # core KEMI: DROP_R_F, the reply is not forwarded (5.6: no KSR.x.drop in Python)
