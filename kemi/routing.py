"""The P-CSCF's routing decisions, written against KSR like an operator's KEMI script.

This is the flow of the C module's example P-CSCF configurations, with the IPsec calls of
`ipsec.module`: initial REGISTER (contact pending, Path, relay), 401 (`ipsec_create`), protected
REGISTER (Security-Verify checked), 200 OK (`ipsec_forward`), calls both ways, de-registration
and the expiry sweep. Every failure answers with a SIP error and logs why.
"""
from __future__ import annotations

import KSR

from ipsec import counters as stat, headers
from ipsec.logtext import clean
from ipsec.module import Module
from kemi import identity
from kemi.core import Core, next_hop_of
from kemi.overload import SHED, Overload

# Option tags and headers the P-CSCF consumes: the core must not see the phone's sec-agree.
SEC_AGREE_HEADERS = ("Security-Client", "Security-Verify")


def refuse_challenge() -> None:
    """No tunnel, no challenge: the keys never reach the phone. The failure route answers 503
    instead (TM would turn a relayed 503 into a 500, RFC 3261 16.7); the status change is the
    fallback should it not run."""
    KSR.hdr.remove("WWW-Authenticate")
    KSR.pv.seti("$avp(ipsec_refused)", 1)
    KSR.textopsx.change_reply_status(500, "Server Internal Error")


class Routing:
    def __init__(self, module: Module, get_def, domain: str, core: Core | None = None,
                 overload: Overload | None = None) -> None:
        self.m = module
        self.domain = domain
        self.core = core or Core.from_defines(get_def)  # kemi/core.py: who the core is
        self.overload = overload or Overload.from_defines(get_def)  # kemi/overload.py
        self.next_hop = self.core.next_hop
        # the Record-Route facing the core (record_route_preset form); r2=on: see phone_facing_rr
        self.core_rr = self.core.rr

    # -- requests -------------------------------------------------------------------------
    def request(self, msg) -> int:
        method = msg.method()
        if method != "ACK":
            # whatever we answer goes to the source address, never to a port the Via names
            # (Kamailio takes the Via's port without rport): a sender on a phone's address,
            # or the phone itself through its SAs, could otherwise have our replies sent in
            # cleartext from our protected port to a phone's protected port that no SA pairs
            # with it. Through the SAs, ipsec_forward sets that source (port_us) before TM
            # fixes the reply path at t_newtran.
            KSR.force_rport()
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return 1
        if method == "OPTIONS" and not KSR.pv.get("$rU") and KSR.is_myself_ruri() > 0:
            KSR.sl.sl_send_reply(200, "OK")
            return 1
        if method == "CANCEL":
            return self._cancel(msg)
        if method == "ACK" and KSR.tm.t_check_trans() > 0:
            # TM says yes for an ACK only when it matches an INVITE as an end-to-end ACK (a
            # 2xx's: with e2e-ACK callbacks, e.g. an operator's config loading the dialog
            # module; an ACK to a negative reply is absorbed inside t_check_trans). Relayed,
            # it skips every check below: only from where INVITEs come from (else a stranger
            # could send it to the phone through its SAs, or to the core in the phone's name;
            # an ACK for a 2xx may carry the session's answer)
            if not self._where_invites_come_from(msg):
                KSR.info("ims-ipsec: ACK from %s dropped: not through known SAs and not from"
                         " the core\n" % msg.source())
                return 1
            KSR.tm.t_relay()  # follows its transaction (INVITE's destination and socket)
            return 1
        if self.m.is_protected(msg):
            return self._from_phone(msg, method)
        if method == "REGISTER" and not self.core.on_core_socket(msg):
            answered = self.overload.shed(msg.source().host)
            if answered is not None:
                if answered == SHED:
                    self.m.counters.count(stat.REGISTERS_SHED)
                return 1
            return self._unprotected_register(msg)
        if self.core.from_core(msg) and method != "REGISTER":
            return self._to_phone(msg)
        KSR.info("ims-ipsec: %s from %s refused: not protected and not from the core\n"
                 % (clean(method), msg.source().host))
        KSR.sl.sl_send_reply(403, "Forbidden - Use Protected Port")
        self._counted(403)
        return 1

    def _cancel(self, msg) -> int:
        """A CANCEL follows its INVITE's transaction, and only from where INVITEs come from:
        through a phone's SAs or from the core. One for no transaction we hold is answered
        481 here, never relayed (before: relayed statelessly, from our trusted address)."""
        if not self._where_invites_come_from(msg):
            KSR.info("ims-ipsec: CANCEL from %s refused: not through known SAs and not from"
                     " the core\n" % msg.source())
            KSR.sl.sl_send_reply(403, "Forbidden")
            return 1
        if KSR.tm.t_check_trans() < 0:
            KSR.info("ims-ipsec: CANCEL from %s for no transaction: 481\n" % msg.source())
            KSR.sl.sl_send_reply(481, "Call/Transaction Does Not Exist")
            return 1
        KSR.tm.t_relay()  # follows its transaction (INVITE's destination and socket)
        return 1

    def _where_invites_come_from(self, msg) -> bool:
        """Through a phone's known SAs, or (unprotected) from the core."""
        if self.m.is_protected(msg):
            return self.m.tunnel_contact(msg) is not None
        return self.core.from_core(msg)

    def _new_transaction(self, msg) -> bool:
        """Create the transaction before any slow work, so a retransmission that reaches
        another worker meanwhile is absorbed by TM instead of being relayed (and challenged,
        and given SAs) a second time. False: nothing more to do for this message."""
        if msg.method() == "ACK":
            return True  # ACKs have no transaction of their own
        created = KSR.tm.t_newtran()
        if created > 0:
            return True
        if created < 0:
            KSR.err("ims-ipsec: %s from %s: no transaction (%d)\n"
                    % (clean(msg.method()), msg.source(), created))
            KSR.sl.sl_reply_error()
        return False  # 0: a retransmission, TM has resent the last reply

    def _unprotected_register(self, msg) -> int:
        if not self._new_transaction(msg):
            return 1
        if not msg.header("Security-Client"):
            KSR.hdr.append_to_reply("Require: sec-agree\r\n")
            KSR.sl.send_reply(421, "Extension Required")
            self._counted(421)
            return 1
        if not msg.header("Contact"):
            KSR.sl.send_reply(400, "Bad Request - Contact")
            return 1
        # nothing is written before the core challenges: ipsec_create saves the contact
        return self._relay_register(msg, protected=False)

    def _from_phone(self, msg, method: str) -> int:
        """Through a phone's SAs. Where replies go is fixed when the transaction is created,
        so the reply path is set (ipsec_forward) before it; refusals before it are stateless."""
        contact = self.m.tunnel_contact(msg)
        if contact is None:
            if method not in ("ACK", "CANCEL") and KSR.tm.t_check_trans() == 0:
                # a late copy of a request whose SAs have gone since (a re-key's first
                # REGISTER, through the old SAs, retransmitted after the new ones took over):
                # TM has answered it again, as for any retransmission
                KSR.info("ims-ipsec: %s from %s on a protected port: a copy of a request"
                         " through no known SAs; answered by its transaction\n"
                         % (clean(method), msg.source()))
                return 1
            KSR.err("ims-ipsec: %s from %s on a protected port: unknown tunnel\n"
                    % (clean(method), msg.source()))
            KSR.sl.sl_send_reply(403, "Forbidden - No Tunnel")
            self._counted(403)
            return 1
        if self.m.ipsec_forward(msg, self.domain) < 0:  # replies to the phone: through its SAs
            KSR.sl.sl_send_reply(403, "Forbidden - No Tunnel")
            self._counted(403)
            return 1
        if not self._new_transaction(msg):
            return 1
        if self.m.check_security_verify(msg, contact, required=(method == "REGISTER")) < 0:
            KSR.sl.send_reply(403, "Forbidden - Security-Verify mismatch")
            self._counted(403)
            return 1
        if method == "REGISTER":
            return self._relay_register(msg, protected=True)
        if not identity.assert_identity(msg, contact):
            KSR.sl.send_reply(403, "Forbidden - Not Registered")
            return 1
        if KSR.siputils.has_totag() > 0:
            if KSR.rr.loose_route() < 0:
                KSR.sl.send_reply(404, "Not Here")
                return 1
            target = next_hop_of(msg)
            if not self.core.may_route_to(target, contact.service_route):
                KSR.info("ims-ipsec: contact %d: in-dialog %s to %s refused: not the core\n"
                         % (contact.id, method, target))
                KSR.sl.send_reply(403, "Forbidden - Route Not Allowed")
                return 1
            self.core.send_to_core(target)
        else:
            KSR.rr.record_route_preset(self.core_rr,
                                       self.m.phone_facing_rr(contact, msg.source().proto))
            KSR.setdsturi(self.next_hop)
            self.core.send_to_core()
        self._strip_sec_agree(msg)
        return self._relay()

    def _relay_register(self, msg, protected: bool) -> int:
        self._strip_sec_agree(msg)
        identity.mark_integrity(msg, protected)
        self.core.send_to_core()  # before add_path: Path names the socket it leaves from
        KSR.path.add_path()
        KSR.tm.t_on_reply("ksr_register_reply")
        KSR.tm.t_on_failure("ksr_register_failure")
        KSR.setdsturi(self.next_hop)
        return self._relay()

    def _to_phone(self, msg) -> int:
        if not self._new_transaction(msg):
            return 1
        if KSR.siputils.has_totag() > 0 or KSR.hdr.is_present("Route") > 0:
            KSR.rr.loose_route()
        if KSR.siputils.has_totag() < 0 and msg.method() != "ACK":
            contact = self.m.contact_for_request(msg)
            if contact is not None and contact.tunnel is not None:
                KSR.rr.record_route_preset(self.m.phone_facing_rr(contact, contact.transport),
                                           self.core_rr)
        if self.m.ipsec_forward(msg, self.domain) < 0:
            KSR.sl.send_reply(480, "Temporarily Unavailable")
            return 1
        return self._relay()

    def _relay(self) -> int:
        if KSR.tm.t_relay() < 0:
            KSR.sl.send_reply(500, "Server Internal Error - Relay Failed")
        return 1

    def _strip_sec_agree(self, msg) -> None:
        for name in SEC_AGREE_HEADERS:
            msg.remove_header(name)
        for name in ("Require", "Proxy-Require"):
            value = msg.header(name)
            if value is None:
                continue
            kept = [t for t in headers.option_tags(value) if t.lower() != "sec-agree"]
            msg.remove_header(name)
            if kept:
                msg.append_header(name, ", ".join(kept))

    # -- replies --------------------------------------------------------------------------
    def register_reply(self, msg) -> int:
        status = msg.status()
        if status == 401:
            if self.m.ipsec_create(msg, self.domain) < 0:
                refuse_challenge()
            return 1
        if status is not None and 200 <= status < 300:
            self.m.save(msg, self.domain)
            self.m.ipsec_forward(msg, self.domain)
            if self.m.is_deregistration(msg):
                self.m.ipsec_destroy(msg, self.domain)
        return 1

    def register_failure(self) -> int:
        """The REGISTER's transaction failed: a 401 we could not protect becomes our 503."""
        if KSR.pv.get("$avp(ipsec_refused)") == 1:
            KSR.tm.t_reply(503, "Service Unavailable")
            self._counted(503)
        return 1

    def sweep(self) -> None:
        self.m.sweep()

    def _counted(self, code: int) -> None:
        self.m.counters.count(f"{stat.REPLIES}{code}")
