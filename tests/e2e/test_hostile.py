"""Hostile input on real Kamailio (issue 10): CK/IK in a 401 that matches no transaction, idle
TCP connections, and 20,000 fuzzed messages at 5060 and at the protected ports."""
from __future__ import annotations

import random
import re
import select
import socket
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from checks import through_esp
import esp_net
from esp_net import ADDRS
from pcscf_net import Kamailio, Phone, _socket, pcscf_policy_count, pcscf_states
from sip import Msg, hostport, parse, reply, token, uri_of, via_sent_by

TCP_LIFETIME = 3
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.fuzz_sip: the same hostile messages as `make fuzz`
KEYS = re.compile(rb"(?:^|[\s,;])(?:ck|ik)\s*=", re.I)


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    """This module's own Kamailio: idle TCP connections live TCP_LIFETIME seconds."""
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio"), TCP_LIFETIME=str(TCP_LIFETIME))
    k.start()
    yield k
    k.stop_and_check()  # the state invariant, then Python errors


def _raw_seen(phone: Phone, seconds: float) -> list[bytes]:
    """Every datagram that reaches any of the phone's UDP sockets for `seconds`."""
    got, deadline = [], time.monotonic() + seconds
    socks = list(phone._udp.values())
    while True:
        ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
        if not ready and time.monotonic() >= deadline:
            return got
        for s in ready:
            got.append(s.recv(65535))


def _drained(link, timeout: float = 60.0) -> None:
    """Wait until no UDP socket of the P-CSCF's namespace has datagrams queued (Recv-Q 0
    twice, 0.5 s apart)."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 2:
        out = esp_net.run("ss", "-N", link.pc, "-H", "-u", "-a", "-n")
        queued = sum(int(line.split()[1]) for line in out.splitlines() if line.strip())
        quiet = quiet + 1 if queued == 0 else 0
        assert time.monotonic() < deadline, f"Kamailio still has {queued} bytes queued"
        time.sleep(0.5)


def _mt_invite(phone: Phone, scscf) -> tuple[str, str, Msg, object]:
    """The S-CSCF calls the registered phone (its Path as Route); returns the Call-ID, the
    From tag, and the INVITE as the phone received it with its socket key."""
    call_id, ftag = token(), token()
    invite = scscf.new_request("INVITE", phone.contact_uri(phone.tunnel.port_us),
                               call_id=call_id, from_tag=ftag, to=f"<sip:{phone.user}@ims.test>",
                               cseq=1, route=[f"<{uri_of(scscf.paths[phone.aor])}>"])
    scscf.request(invite)
    req, key, _ = phone.wait(lambda m: m.is_request and m.method == "INVITE"
                             and m.get("Call-ID") == call_id, "INVITE")
    return call_id, ftag, req, key


def _stranger(link, phone: Phone) -> socket.socket:
    """Another UDP socket on the phone's address, on a port of the kernel's choosing that no
    other socket holds: without SO_REUSEADDR, which the phone's sockets have (with it on both,
    the kernel may hand out a port the phone's protected socket holds, and the stranger's
    cleartext would then be the phone's own)."""
    s = _socket(link.ue, 4, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    s.bind((phone.ip, 0))
    return s


def test_a_401_for_a_gone_transaction_never_reaches_the_phone(link, scscf, kamailio):
    """The S-CSCF answers a REGISTER whose transaction TM no longer has (after fr_timer or a
    restart: here its Via branch names no transaction). Before: Kamailio forwarded the 401
    statelessly and the phone read ck= and ik= on its unprotected port."""
    phone = Phone(link, scscf, user="late")
    scscf.stray_challenge = True
    try:
        phone.register(protected=False)
        seen = _raw_seen(phone, 3.0)
    finally:
        scscf.stray_challenge = False
    assert not [d for d in seen if KEYS.search(d)], "CK/IK reached the phone"
    assert not [d for d in seen if d.startswith(b"SIP/2.0 401")], "a stray 401 reached the phone"
    assert "matches no transaction: dropped, its challenge carries CK/IK" in kamailio.log()


@pytest.mark.parametrize("port", [5060, 5063])
def test_an_idle_tcp_connection_is_closed(link, kamailio, port):
    """Before: tcp_connection_lifetime=3605, anyone could hold a connection for an hour."""
    conn = _socket(link.ue, 4, socket.SOCK_STREAM)
    conn.connect((ADDRS[4][0], port))
    conn.settimeout(TCP_LIFETIME + 20)
    t0 = time.monotonic()
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass
    finally:
        conn.close()
    assert time.monotonic() - t0 < TCP_LIFETIME + 20


# -- the fuzz through real Kamailio -------------------------------------------------------------

FLOOD = 10_000  # per target group: 5060, and the protected ports
PROBE_EVERY = 250


def _options(sock: socket.socket, dst: tuple[str, int]) -> None:
    """OPTIONS to the P-CSCF itself from `sock` (answered 200 before any protection check),
    waited for: Kamailio has worked through what came before it on that socket."""
    me = sock.getsockname()
    call_id = token()
    m = Msg(f"OPTIONS sip:{hostport(*dst)} SIP/2.0")
    for n, v in (("Via", f"SIP/2.0/UDP {hostport(me[0], me[1])};branch=z9hG4bK{token()};rport"),
                 ("From", f"<sip:probe@{me[0]}>;tag=1"), ("To", f"<sip:{hostport(*dst)}>"),
                 ("Call-ID", call_id), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")):
        m.add(n, v)
    deadline = time.monotonic() + 30
    sock.sendto(m.encode(), dst)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            sock.sendto(m.encode(), dst)
            continue
        data = sock.recv(65535)
        try:
            r = parse(data)
        except Exception:  # noqa: BLE001 - whatever else came back
            continue
        if not r.is_request and r.get("Call-ID") == call_id and r.status == 200:
            return
    raise AssertionError(f"Kamailio stopped answering OPTIONS at {dst}")


def _store_rows(kamailio) -> tuple[set, set, set]:
    """Contact ids, tunnel ids, and the registered contacts with their tunnels. Garbage may
    add none of them; the sweep may meanwhile remove what earlier tests left unconfirmed
    (PENDING_LIFETIME is shorter than the flood)."""
    db = sqlite3.connect(kamailio.run_dir / "ipsec-pcscf.sqlite")
    try:
        return ({r[0] for r in db.execute("SELECT id FROM contacts")},
                {r[0] for r in db.execute("SELECT id FROM tunnels")},
                set(db.execute("SELECT id, tunnel_id, uri FROM contacts"
                               " WHERE state = 'registered'")))
    finally:
        db.close()


def _pool(phone: Phone) -> list[tuple[str, str]]:
    """tests/fuzz_sip.py's seeds, with this rig's addresses (phone, P-CSCF, S-CSCF)."""
    from tests.fuzz_sip import seeds
    subst = {"10.0.0.2": phone.ip, "10.0.0.1": phone.pcscf, "10.0.0.9:5060": f"{phone.pcscf}:6060",
             "31000": str(phone.tunnel.port_uc), "31001": str(phone.tunnel.port_us)}
    out = []
    for msg, kind in seeds(phone.security_server):
        for a, b in subst.items():
            msg = msg.replace(a, b)
        out.append((msg, kind))
    return out


def test_twenty_thousand_hostile_messages_leave_kamailio_answering_and_nothing_behind(
        link, scscf, kamailio):
    from tests.fuzz_sip import messages
    phone = Phone(link, scscf, user="steady")
    phone.full_registration()
    pcscf = phone.pcscf
    t = phone.tunnel
    rows, sas, policies = _store_rows(kamailio), len(pcscf_states(link)), pcscf_policy_count(link)
    processes = len(kamailio.processes())

    plain = _stranger(link, phone)
    stranger = _stranger(link, phone)  # protected ports, but not from the phone's protected ports
    through_sas = phone._udp[t.port_uc]  # port_uc -> port_ps: ESP, SA1
    targets = [  # (socket, destination, share of the protected group)
        (through_sas, (pcscf, t.port_ps)),
        (stranger, (pcscf, t.port_ps)),
        (stranger, (pcscf, t.port_pc)),
    ]
    rng = random.Random(20261204)
    stream = messages(rng, _pool(phone))
    seen: list[bytes] = []
    scscf.silent = True
    t0 = time.monotonic()
    # nothing may reach the phone's protected ports in cleartext, during the flood or after
    # (what Kamailio answers through SA2/SA3 is ESP; a fragment after the first has no ports
    # and is not captured, its first fragment is)
    leak = esp_net.Capture(link, "flood-leak", f"src host {pcscf} and (tcp or udp) and"
                                               f" (dst port {t.port_uc} or dst port {t.port_us})")
    leak.__enter__()
    try:
        for group in ("5060", "protected"):
            for i in range(FLOOD):
                msg, _, _ = next(stream)
                data = msg.encode("utf-8", "surrogatepass")[:65000]
                if group == "5060":
                    sock, dst = plain, (pcscf, 5060)
                else:
                    sock, dst = targets[i % len(targets)]
                sock.sendto(data, dst)
                if i % PROBE_EVERY == PROBE_EVERY - 1:
                    _options(sock, dst)
                    seen += _raw_seen(phone, 0)  # the phone's sockets drained, and read
        elapsed = time.monotonic() - t0
        print(f"{2 * FLOOD} hostile messages through Kamailio in {elapsed:.1f} s")
        for sock, dst in [(plain, (pcscf, 5060)), *targets]:
            _options(sock, dst)
        # Kamailio may still be working through the flood's backlog (its sockets' queues):
        # what it answers of that comes after, not during, the phone's check below
        _drained(link)
        # what Kamailio relayed to the core is still retransmitted by TM until fr_timer (8 s):
        # an S-CSCF answering it would challenge it, which is no garbage's doing (and the 408s
        # come then)
        time.sleep(10)
        leak.__exit__(None, None, None)
        assert not leak.packets, f"cleartext to the phone's protected ports: {leak.packets[:5]}"
    finally:
        scscf.silent = False
        if leak.proc.returncode is None:
            leak.__exit__(None, None, None)
    seen += _raw_seen(phone, 0.5)
    # the fuzzed messages carry ck= of their own (echoed in our replies): what must never
    # come back is a key the S-CSCF issued
    issued = [k.hex().encode() for pair in scscf.keys.values() for k in pair]
    assert not [d for d in seen if any(k in d.lower() for k in issued)], "CK/IK reached the phone"
    after = _store_rows(kamailio)
    assert after[0] <= rows[0] and after[1] <= rows[1], f"the flood added rows: {rows} -> {after}"
    assert after[2] == rows[2], f"the flood changed a registration: {rows[2]} -> {after[2]}"
    # fewer only by what the sweep removed of earlier tests' unconfirmed tunnels (4 + 4 each)
    gone = len(rows[1] - after[1])
    assert (len(pcscf_states(link)), pcscf_policy_count(link)) == (sas - 4 * gone,
                                                                   policies - 4 * gone)
    assert len(kamailio.processes()) == processes, "a Kamailio process died or was added"
    # the phone is still served through its SAs (while Kamailio may still answer the
    # flood's senders from the protected ports, in cleartext, as they wrote to it)
    with through_esp(phone, "sa1", "sa3", strangers=True):
        phone.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
        phone.wait_reply(200, "MESSAGE")
    plain.close()
    stranger.close()


def test_a_stranger_cannot_aim_our_replies_at_the_phones_protected_ports(link, scscf, kamailio):
    """A sender on the phone's address (another device behind its NAT, or a spoofer) writes
    to our protected ports from a port of its own with a Via naming the phone's protected
    client port. Our 403 must go back to the sender's port: sent to the Via's port it left
    in cleartext from our protected port to the phone's (no policy covers that pair)."""
    phone = Phone(link, scscf, user="aimed")
    phone.full_registration()
    t = phone.tunnel
    stranger = _stranger(link, phone)
    try:
        with esp_net.Capture(link, "aimed") as cap:
            for local in (t.port_pc, t.port_ps, 5060):
                call_id = token()
                msg = (f"MESSAGE sip:bob@ims.test SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP {hostport(phone.ip, t.port_uc)};branch=z9hG4bK{call_id}\r\n"
                       f"Max-Forwards: 70\r\nFrom: <sip:aimed@ims.test>;tag=x{call_id}\r\n"
                       f"To: <sip:bob@ims.test>\r\nCall-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\n"
                       f"Content-Length: 0\r\n\r\n")
                stranger.sendto(msg.encode(), (phone.pcscf, local))
                ready, _, _ = select.select([stranger], [], [], 3.0)
                assert ready, f"no answer at the sender's port for its MESSAGE to {local}"
                answer = parse(stranger.recv(65535))
                assert answer.status == 403 and answer.get("Call-ID") == call_id
            time.sleep(0.3)
        clear = [p for p in cap.cleartext() if p.dport in (t.port_uc, t.port_us)]
        assert not clear, f"cleartext to the phone's protected ports: {clear[:5]}"
        assert _raw_seen(phone, 0.3) == []
    finally:
        stranger.close()


def test_a_2xx_the_core_sends_again_after_its_transaction_reaches_the_phone_through_its_sas(
        link, scscf, kamailio):
    """A 2xx to an INVITE sent again after the P-CSCF's transaction ended (TM keeps it
    wt_timer, 5 s; the callee's UA retransmits for 32 s until it has the ACK) matches no
    transaction: Kamailio forwards it along its second Via from the socket it came to. That
    was 5060: the phone's port_us got it in cleartext. It must come through SA3."""
    phone = Phone(link, scscf, user="late")
    phone.full_registration()
    t = phone.tunnel
    call_id = token()
    phone.request("INVITE", "sip:bob@ims.test", call_id=call_id, to="<sip:bob@ims.test>",
                  route=f"<sip:{hostport(phone.pcscf, t.port_ps)};lr>")
    phone.wait_reply(200, "INVITE")
    (invite,) = [m for m in scscf.seen
                 if m.is_request and m.method == "INVITE" and m.get("Call-ID") == call_id]
    time.sleep(6)  # past wt_timer: the transaction is gone
    late = reply(invite, 200, "OK", to_tag="late")
    with through_esp(phone, "sa3"):
        scscf._send(late, via_sent_by(invite.get("Via")))
        _, key, peer = phone.wait(
            lambda m: not m.is_request and m.get("Call-ID") == call_id and "late" in m.get("To"),
            "the 200 OK sent again")
    assert (key, peer[1]) == (t.port_us, t.port_pc)


def test_a_phone_cannot_aim_a_response_through_its_sas_at_another_phone(link, scscf, kamailio):
    """A phone writes a response through its own SAs (port_us -> port_pc) whose second Via
    names another phone's port_us. Forwarded along it from our port_pc, it reached that
    phone: through that phone's SA3 when the two share port_pc (the port pairs are shared),
    written by the first phone as if by the P-CSCF. A phone's reply that matches no
    transaction goes only to the core."""
    aimer, target = Phone(link, scscf, user="aimer"), Phone(link, scscf, user="target")
    aimer.full_registration()
    target.full_registration()
    ta, tt = aimer.tunnel, target.tunnel
    call_id = token()
    r = Msg("SIP/2.0 200 OK")
    r.add("Via", f"SIP/2.0/UDP {hostport(aimer.pcscf, ta.port_pc)};branch=z9hG4bK{call_id}")
    r.add("Via", f"SIP/2.0/UDP {hostport(target.ip, tt.port_us)};rport={tt.port_us};"
                 f"branch=z9hG4bKx{call_id}")
    r.add("From", f"<sip:bob@ims.test>;tag=f{call_id}")
    r.add("To", f"<sip:target@ims.test>;tag=t{call_id}")
    r.add("Call-ID", call_id)
    r.add("CSeq", "1 INVITE")
    with esp_net.Capture(link, "aimed-at-target") as cap:
        aimer.send(r, ta.port_us, ta.port_pc)  # through its SA4
        time.sleep(1.0)
    assert _raw_seen(target, 0.3) == [], "the aimed response reached the other phone"
    assert not [p for p in cap.cleartext() if p.dport in (tt.port_uc, tt.port_us)]
    assert "its next hop" in kamailio.log() and "is not the core" in kamailio.log()


def test_a_stranger_cannot_answer_a_call_to_the_phone(link, scscf, kamailio):
    """An MT INVITE leaves from our port_pc through SA3; its replies come back through SA4.
    A stranger on the phone's address that knows the request (with ealg=null anyone on the
    path reads it) answers it in cleartext to our port_pc: TM matches replies by branch,
    not by sender, so its 486 ended the call at the S-CSCF. Replies that reach a protected
    client port must come through a phone's SAs (or from the core)."""
    phone = Phone(link, scscf, user="callee")
    phone.full_registration()
    t = phone.tunnel
    call_id, _, req, key = _mt_invite(phone, scscf)
    dropped = _dropped(kamailio)
    stranger = _stranger(link, phone)
    try:
        stranger.sendto(reply(req, 486, "Busy Here", to_tag="forged").encode(),
                        (phone.pcscf, t.port_pc))
        time.sleep(1.0)
        phone.respond(req, key, 200, "OK", "real")
        scscf.wait_reply(200, "INVITE")
    finally:
        stranger.close()
    forged = [m for m in scscf.seen
              if not m.is_request and m.get("Call-ID") == call_id and m.status == 486]
    assert not forged, "the stranger's 486 reached the S-CSCF"
    assert "not through a phone's SAs" in kamailio.log()
    assert _dropped(kamailio) == dropped + 1  # the operator's counter


def _dropped(k) -> int:
    return k.statistic("ipsec_replies_dropped")


def test_the_phones_2xx_sent_again_after_its_transaction_reaches_the_core(link, scscf, kamailio):
    """The other direction of a late 2xx: the callee (the phone) sends its 200 OK again after
    the MT INVITE's transaction ended (it has no ACK yet): through its SA4, to the core."""
    phone = Phone(link, scscf, user="slowack")
    phone.full_registration()
    call_id, _, req, key = _mt_invite(phone, scscf)
    phone.respond(req, key, 200, "OK", "callee")
    scscf.wait_reply(200, "INVITE")
    time.sleep(6)  # past wt_timer: the transaction is gone
    with through_esp(phone, "sa4"):
        phone.respond(req, key, 200, "OK", "callee")
        again = scscf.wait_reply(200, "INVITE")
    assert again.get("Call-ID") == call_id


def test_a_stranger_cannot_answer_the_phones_request_at_our_server_port(link, scscf, kamailio):
    """With one socket, the phone's request leaves for the core from our port_ps (our Via
    names it) and the core's replies come back there. A stranger on the phone's address that
    knows the relayed request answers it there in cleartext: TM took its 486 as the core's
    and sent it to the phone through SA3."""
    d = kamailio.defines
    first = int(d.get("IPSEC_CLIENT_PORT", "5062"))
    client_ports = range(first, first + int(d.get("IPSEC_MAX_CONNECTIONS", "2")))
    # the C module's default ports overlap (5063 is pair 0's server and pair 1's client port,
    # a protected client port, refused by the rule above): a phone on a server port only
    for n in range(4):
        phone = Phone(link, scscf, user=f"asker{n}")
        phone.full_registration()
        if phone.tunnel.port_ps not in client_ports:
            break
    t = phone.tunnel
    assert t.port_ps not in client_ports, "no phone got a pair whose server port is only that"
    call_id = token()
    # the stub has no handler for SUBSCRIBE: it records the relayed request, answers nothing
    phone.request("SUBSCRIBE", "sip:bob@ims.test", call_id=call_id, to="<sip:bob@ims.test>")
    deadline = time.monotonic() + 5
    while not (relayed := [m for m in scscf.seen if m.is_request and m.method == "SUBSCRIBE"
                           and m.get("Call-ID") == call_id]):
        assert time.monotonic() < deadline, "the SUBSCRIBE never reached the core"
        time.sleep(0.05)
    top = relayed[0].all("Via")[0]
    assert f":{t.port_ps};" in top, top  # one socket: relayed from the port it came to
    dropped = _dropped(kamailio)
    stranger = _stranger(link, phone)
    try:
        stranger.sendto(reply(relayed[0], 486, "Busy Here", to_tag="forged").encode(),
                        (phone.pcscf, t.port_ps))
        time.sleep(1.0)
    finally:
        stranger.close()
    got = [m for m in _raw_seen(phone, 0.5) if b"forged" in m]
    assert not got, "the stranger's 486 reached the phone"
    assert "from a phone's address, not through its SAs" in kamailio.log()
    assert _dropped(kamailio) == dropped + 1


def test_a_strangers_ack_never_reaches_the_phone(link, scscf, kamailio):
    """A stranger that knows the dialog (with ealg=null anyone on the path does) sends the ACK
    for the phone's 200 OK to 5060, with a body of its own (an ACK for a 2xx may carry the
    session's answer): it must not reach the phone; the core's own ACK does. (With this
    kamailio.cfg TM does not match end-to-end ACKs, so this passed before the ACK rule in
    Routing.request too: it guards the path, the unit tests cover the rule.)"""
    phone = Phone(link, scscf, user="acked")
    phone.full_registration()
    call_id, ftag, req, key = _mt_invite(phone, scscf)
    phone.respond(req, key, 200, "OK", "acked")
    r200 = scscf.wait_reply(200, "INVITE")
    ack = scscf.new_request("ACK", uri_of(r200.get("Contact")), call_id=call_id, from_tag=ftag,
                            to=r200.get("To"), cseq=1,
                            route=list(reversed(r200.all("Record-Route"))))
    stranger = _stranger(link, phone)
    try:
        port = stranger.getsockname()[1]
        ack.headers[0] = ("Via", f"SIP/2.0/UDP {hostport(phone.ip, port)};branch=z9hG4bK{token()}")
        ack.body = "v=0\r\no=forged 1 1 IN IP4 6.6.6.6\r\n"
        stranger.sendto(ack.encode(), (phone.pcscf, 5060))
        time.sleep(1.0)
    finally:
        stranger.close()
    assert not [m for m in _raw_seen(phone, 0.5) if b"forged" in m], "the ACK reached the phone"
    # the core's own ACK still goes through
    ack.headers[0] = ("Via", f"SIP/2.0/UDP {scscf.addr}:6060;branch=z9hG4bK{token()}")
    ack.body = ""
    scscf.request(ack)
    phone.wait(lambda m: m.is_request and m.method == "ACK" and m.get("Call-ID") == call_id,
               "the core's ACK")


def test_a_copy_of_the_phones_request_through_no_known_sas_meets_its_transaction(
        link, scscf, kamailio):
    """A copy of a request whose transaction exists, arriving on a protected port through no
    SAs we know (a re-key's first REGISTER retransmitted after its old SAs went, or anyone
    replaying it): TM answers it again along the transaction's reply path (t_check_trans),
    instead of our 403 and an ERROR line (seen in make soak)."""
    phone = Phone(link, scscf, user="copied")
    phone.full_registration()
    t = phone.tunnel
    call_id = token()
    sent = phone.request("MESSAGE", "sip:bob@ims.test", call_id=call_id, to="<sip:bob@ims.test>")
    phone.wait_reply(200, "MESSAGE")
    stranger = _stranger(link, phone)
    try:
        with through_esp(phone, "sa3", strangers=True):
            stranger.sendto(sent.encode(), (phone.pcscf, t.port_ps))
            again, _, peer = phone.wait(
                lambda m: not m.is_request and m.status == 200 and m.get("Call-ID") == call_id,
                "the 200 OK again")
        assert select.select([stranger], [], [], 0.5)[0] == [], "the copy's sender got an answer"
    finally:
        stranger.close()
    assert peer[1] == t.port_pc
    assert "a copy of a request through no known SAs" in kamailio.log()
