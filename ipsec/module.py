"""The functions an operator's KEMI script calls: ipsec_create, ipsec_forward, ipsec_destroy,
ipsec_destroy_by_contact, plus the registrar steps they rely on, start-up and the expiry sweep.

Names, arguments, flags and return values are those of Kamailio's ims_ipsec_pcscf (1 success,
-1 failure). Each function takes the current message as an argument (`kemi.message.KsrMessage`
over KSR; the same class over the KSR test double in tests), logs every failure with its cause
(never a key) and never lets an exception escape into Kamailio.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

from . import (challenge, counters as stat, headers, identities, lifetimes, limits as flood,
               reconcile, renewals, secagree, tunnel as kernel, warm)
from .algorithms import AlgorithmError
from .logtext import clean
from .limits import Limits
from .params import Params
from .sipuri import Address, SipUriError, hostport, parse_uri
from .store import (PENDING, REGISTERED, Binding, Contact, Lease, SpiExhausted, Store,
                    StoreError, Tunnel, UeLocks, UeSide)
from .xfrm import SA, Lifetime, Xfrm, XfrmError, XfrmExists

T = TypeVar("T")

# ipsec_create flags
CREATE_DELETE_UNUSED = 0x01
# ipsec_forward flags (bit values of the C module)
FORCE_SOCKET = 0x01
REVERSE_SEARCH = 0x02
USE_DST_URI = 0x04
USE_NEW_RURI = 0x08
NO_ALIAS = 0x10
KEEP_DST_URI = 0x20
TCP_USE_CLIENT_PORT = 0x40
DST_URI_TRANSPORT = 0x80
USE_VIA = 0x100
UDP_FALLBACK_TCP = 0x200

# Transaction notes (AVPs in Kamailio) ipsec_forward leaves for the replies of a request
NOTE_CONTACT = "ipsec_contact"
NOTE_TUNNEL = "ipsec_tunnel"

DUPLICATE_RETRIES = 3
# Rounds of evictions (ipsec/limits.py) one challenge may go through before it gives up
EVICTION_ROUNDS = 3
DEFAULT_EXPIRES = 3600
# A tunnel whose last reply is still on its way (200 OK to a de-REGISTER) is removed by the
# sweep this long after ipsec_destroy, never by the reply route itself.
DEFERRED_TEARDOWN = 1.0
# A lease no contact uses is only left over once it is this old: a worker between lease and
# attach (installing SAs can take seconds when the kernel loads its crypto) is not one.
STALE_LEASE_AGE = 60.0
# How often the sweep looks for such leases: the query reads every lease (an index on
# leased_at would cost a page at each challenge), and they are rare (a worker that died).
UNUSED_CHECK_EVERY = 10.0


class ModuleError(Exception):
    """The module cannot start (bad parameter, store or kernel unusable)."""


class Log(Protocol):
    def info(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def err(self, text: str) -> None: ...


class RequestView(Protocol):
    def method(self) -> str: ...
    def header(self, name: str) -> str | None: ...
    def first_header(self, name: str) -> str | None: ...
    def source(self) -> Address: ...
    def local(self) -> Address: ...
    def ruri(self) -> str: ...
    def dst_uri(self) -> str | None: ...


class Message(RequestView, Protocol):
    def is_request(self) -> bool: ...
    def status(self) -> int | None: ...
    def original_ruri(self) -> str: ...
    def request(self) -> RequestView: ...
    def append_header(self, name: str, value: str) -> None: ...
    def remove_header(self, name: str) -> None: ...
    def set_dst_uri(self, uri: str) -> None: ...
    def set_send_socket(self, sock: str) -> None: ...
    def set_reply_path(self, sock: str, target: str) -> None: ...
    def note(self, name: str, value: int) -> None: ...
    def noted(self, name: str) -> int | None: ...


class Refused(Exception):
    """A function cannot do its job for this message; the text says why (logged at error).
    `cause`: the counter an ipsec_create failure counts under (ipsec/counters.py)."""

    def __init__(self, text: str, cause: str = stat.REFUSED) -> None:
        super().__init__(text)
        self.cause = cause


def _failure_cause(e: Exception) -> str:
    if isinstance(e, Refused):
        return e.cause
    if isinstance(e, (secagree.SecAgreeError, headers.HeaderError, SipUriError)):
        return stat.PHONE
    if isinstance(e, SpiExhausted):
        return stat.POOL
    if isinstance(e, StoreError):
        return stat.STORE
    if isinstance(e, (XfrmError, AlgorithmError)):
        return stat.KERNEL
    return stat.INTERNAL


def kemi_function(fn: Callable[..., int]) -> Callable[..., int]:
    """1/-1 for Kamailio: refusals and any unexpected error are logged, never raised; an
    ipsec_create failure is counted by its cause."""

    @functools.wraps(fn)
    def wrapper(self: "Module", *args, **kwargs) -> int:
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - nothing may escape into Kamailio
            self._err(f"{fn.__name__}: {_describe(e)}")
            if fn.__name__ == "ipsec_create":
                self.counters.count(stat.CREATE_FAILED + _failure_cause(e))
        return -1

    return wrapper


def _describe(e: Exception) -> str:
    if isinstance(e, Refused):
        return str(e)
    if isinstance(e, (secagree.SecAgreeError, headers.HeaderError, SipUriError)):
        return f"bad message from the phone: {e}"
    if isinstance(e, (StoreError, XfrmError, AlgorithmError)):
        return f"{type(e).__name__}: {e}"
    return f"internal error {type(e).__name__}: {e}"


def _sock(proto: str, host: str, port: int) -> str:
    return f"{proto}:{hostport(host, port)}"


def _uri(host: str, port: int, proto: str | None = None) -> str:
    return f"sip:{hostport(host, port)}" + (f";transport={proto}" if proto and proto != "udp" else "")


@dataclass
class Module:
    """One per Kamailio process tree: built in mod_init, used by every worker after the fork
    (the store connection and the netlink socket reopen themselves in each process)."""

    params: Params
    store: Store
    xfrm: Xfrm
    log: Log
    locks: UeLocks
    expiry_grace: float = 30.0
    limits: Limits = Limits()
    lifetime_margin: float = lifetimes.MARGIN  # kernel hard lifetimes: ipsec/lifetimes.py
    marker: int = kernel.MARKER
    clock: Callable[[], float] = time.time
    counters: stat.Counters = dataclasses.field(default_factory=stat.NoCounters)
    unused_checked: float = float("-inf")  # when the sweep last looked for leftover leases

    @classmethod
    def from_defines(cls, get_def: Callable[[str], str], log: Log,
                     counters: stat.Counters | None = None) -> "Module":
        """Build from kamailio.cfg defines (KSR.kx.get_def); a bad value raises ParamError."""
        params = Params.from_defines(get_def)
        for warning in params.warnings():
            log.warn(f"ims-ipsec: {warning}\n")
        run_dir = (get_def("RUN_DIR") or "").strip('"') or "/var/run/kamailio"
        path = params.ipsec_store or os.path.join(run_dir, "ipsec-pcscf.sqlite")
        grace = (get_def("EXPIRY_GRACE") or "30").strip('"')
        margin = lifetimes.margin_from((get_def("LIFETIME_MARGIN") or "").strip().strip('"'))
        limits = Limits.from_defines(get_def, params.ipsec_spi_id_range // 2)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            store = Store(path, spi_start=params.ipsec_spi_id_start,
                          spi_range=params.ipsec_spi_id_range,
                          client_port=params.ipsec_client_port,
                          server_port=params.ipsec_server_port,
                          max_connections=params.ipsec_max_connections,
                          pending_lifetime=limits.pending_lifetime)
            return cls(params, store, Xfrm(), log, UeLocks(path + ".lock"),
                       expiry_grace=float(grace), limits=limits,
                       lifetime_margin=margin,
                       counters=counters or stat.NoCounters())
        except (OSError, ValueError, StoreError) as e:
            raise ModuleError(f"store {path}: {e}") from None

    def close(self) -> None:
        """Drop this process's store connection and netlink socket (before Kamailio forks:
        neither may be shared with the workers, which reopen their own on first use)."""
        self.store.close()
        self.xfrm.close()
        self.locks.close()

    # -- logging ------------------------------------------------------------------------------
    def _err(self, text: str) -> None:
        self.log.err(f"ims-ipsec: {clean(text)}\n")

    def _info(self, text: str) -> None:
        self.log.info(f"ims-ipsec: {clean(text)}\n")

    # -- where a message stands ---------------------------------------------------------------
    def _pcscf_host(self, ue_host: str) -> str:
        addr = self.params.ipsec_listen_addr6 if ":" in ue_host else self.params.ipsec_listen_addr
        if not addr:
            raise Refused(f"no protected listen address for the family of {ue_host}")
        return addr.strip("[]")

    def _on_protected_port(self, local: Address) -> bool:
        return (local.port in self.params.protected_ports
                and local.host in self.params.protected_addrs)

    def tunnel_contact(self, req: RequestView) -> Contact | None:
        """The contact whose SAs this request came through, with `tunnel` = those SAs (its
        tunnel in use, or the pending one of a re-registration: the pair must be theirs).
        Looked up once per message (`_memoised`)."""
        return self._memoised(req, "tunnel_contact", lambda: self._find_tunnel_contact(req))

    def _memoised(self, msg: object, key: str, look_up: Callable[[], T]) -> T:
        """`look_up()`, kept in the message's `memo` dict (if it has one) until this process
        changes the store: the routing script and the functions it calls ask the same
        question of one message several times, and each answer is a read transaction; a
        script that destroys a contact and then forwards the same request reads anew."""
        memo = getattr(msg, "memo", None)
        if memo is None:
            return look_up()
        changes = self.store.changes()
        kept = memo.get(key)
        if kept is not None and kept[0] == changes and changes >= 0:
            return kept[1]
        found = look_up()
        memo[key] = (self.store.changes(), found)
        return found

    def _find_tunnel_contact(self, req: RequestView) -> Contact | None:
        src, local = req.source(), req.local()
        if not self._on_protected_port(local):
            return None
        contact = self.store.find_by_flow(src.host, src.port, local.port)
        if contact is None:
            return None
        for t in (contact.tunnel, contact.pending):
            if t is not None and (src.port, local.port) in {
                    (t.ue.port_uc, t.lease.port_ps), (t.ue.port_us, t.lease.port_pc)}:
                return dataclasses.replace(contact, tunnel=t)
        return None

    def is_protected(self, msg: RequestView) -> bool:
        """Did this request arrive on a protected port (from a phone, through ESP)?"""
        return self._on_protected_port(msg.local())

    # -- registrar steps ----------------------------------------------------------------------
    @kemi_function
    def save_pending(self, msg: Message, domain: str) -> int:
        """An unprotected REGISTER from a phone: remember its contact until the 200 OK."""
        found = headers.contacts(msg.header("Contact"))
        if not found or found[0][0] == "*":
            raise Refused("REGISTER without a contact to protect")
        via = headers.top_via(msg.header("Via"))
        contact = self.store.save_pending(headers.aor(msg.first_header("To")), found[0][0],
                                          via, msg.source())
        self._info(f"pending contact {contact.id} {contact.aor} from {contact.received}")
        return 1

    @kemi_function
    def save(self, msg: Message, domain: str) -> int:
        """The 200 OK to a REGISTER: the contact is registered until the expiry it grants,
        and its binding becomes the REGISTER's Contact (a re-registration through new SAs
        names the phone's new protected server port there) over the REGISTER's transport.
        A REGISTER that came through the pending SAs confirms them (33.203 7.4), in the same
        transaction; the old SAs go."""
        req = msg.request()
        noted = _noted_tunnel(msg)
        if noted is not None:
            contact_id, through = noted
            fallback_uri = None
        else:
            contact = self._contact_of_register(req)
            contact_id, fallback_uri = contact.id, contact.uri
            through = contact.tunnel.lease.spi_pc if contact.tunnel is not None else None
        found = headers.contacts(req.header("Contact"))
        uri = found[0][0] if found and found[0][0] != "*" else fallback_uri
        if uri is None:
            raise Refused(f"REGISTER from {req.source()} without a Contact to register")
        params = (_params_of(uri, msg.header("Contact"))
                  or _params_of(uri, req.header("Contact")) or {})
        expires = headers.expires_of(params, msg.first_header("Expires"), DEFAULT_EXPIRES)
        if expires == 0:
            if through is not None:
                self._retire_locked(self.store.promote(contact_id, through))
            return 1
        self._retire_locked(self.store.register(
            contact_id, self.clock() + expires, uri=uri, received=req.source(), through=through,
            associated=identities.registered(msg.header("P-Associated-URI"),
                                             req.first_header("To")),
            service_route=identities.uri_list(msg.header("Service-Route"))))
        return 1  # the kernel lifetime follows at the next sweep (ipsec/renewals.py)

    def is_deregistration(self, msg: Message) -> bool:
        """Was the transaction's REGISTER a de-registration (every contact expires=0)?"""
        try:
            req = msg.request()
            found = headers.contacts(req.header("Contact"))
            if any(uri == "*" for uri, _ in found):
                return True
            exp = req.first_header("Expires")
            return bool(found) and all(
                headers.expires_of(p, exp, DEFAULT_EXPIRES) == 0 for _, p in found)
        except (headers.HeaderError, SipUriError):
            return False

    def _contact_of_register(self, req: RequestView) -> Contact:
        """The contact a REGISTER (seen from its reply) belongs to: the one whose SAs it came
        through, or the one its unprotected binding names."""
        contact = self.tunnel_contact(req)
        if contact is None and not self._on_protected_port(req.local()):
            contact = self.store.find_binding(headers.aor(req.first_header("To")), req.source())
        if contact is None:
            raise Refused(f"no contact for the REGISTER from {req.source()}")
        return contact

    def _tunnel_of_register(self, msg: Message) -> tuple[int, int]:
        """(contact id, spi_pc of the SAs) a protected REGISTER came through: as the request
        route noted them, else looked up."""
        noted = _noted_tunnel(msg)
        if noted is not None:
            return noted
        contact = self._contact_of_register(msg.request())
        return contact.id, contact.tunnel.lease.spi_pc

    def _retire_locked(self, old: Tunnel | None) -> None:
        """`_retire` from a reply route, where the worker holds no phone's lock: under the
        lock of the retired tunnel's phone, so that the sweep's renewal (ipsec/renewals.py)
        never reads a policy of it before and updates it after its removal (an update adds
        a policy that is not there back)."""
        if old is not None:
            with self.locks.held(old.ue.host):
                self._retire(old)

    def _retire(self, old: Tunnel | None) -> None:
        """The tunnel a promotion replaced: out of the kernel, its lease back."""
        if old is not None:
            self._remove_tunnels([old])
            self.counters.count(stat.TUNNELS_REKEYED)

    # -- ipsec_create ---------------------------------------------------------------------------
    @kemi_function
    def ipsec_create(self, msg: Message, domain: str, flags: int = 0) -> int:
        """The 401 to a REGISTER: choose the phone's offer, install its SAs (or keep them),
        add Security-Server, and take CK/IK out of the challenge before it leaves.

        An unprotected REGISTER's contact is saved here, in the transaction that stages its
        tunnel (save_pending before is not needed): nothing is written for a REGISTER the
        core does not challenge."""
        if flags & CREATE_DELETE_UNUSED:
            self._remove_unused()
        req = msg.request()
        through: int | None = None
        if self._on_protected_port(req.local()):
            key, through = self._tunnel_of_register(msg)
        else:
            key = _binding_of(req)
        client = req.header("Security-Client")
        if not client:
            raise Refused(f"REGISTER from {req.source()} has no Security-Client", stat.PHONE)
        offer = secagree.choose_offer(secagree.parse_security_header(client),
                                      self.params.ipsec_preferred_alg,
                                      self.params.ipsec_preferred_ealg)
        challenge = msg.first_header("WWW-Authenticate")
        if not challenge:
            raise Refused("401 without WWW-Authenticate", stat.CORE)
        try:
            ck, ik, stripped = secagree.extract_ck_ik(challenge)
        except secagree.SecAgreeError as e:
            raise Refused(f"401 from the core has no usable keys: {e}", stat.CORE) from None
        ue = UeSide(req.source().host, offer.spi_c, offer.spi_s, offer.port_c, offer.port_s)
        digest = self.store.keys_digest(ck, ik)
        with self.locks.held(ue.host):  # one phone's tunnels change in one worker at a time
            server = self._tunnel_for_challenge(key, through, ue, offer, ck, ik, digest,
                                                client, _transaction_key(req))
        msg.remove_header("WWW-Authenticate")
        msg.append_header("WWW-Authenticate", stripped)
        msg.append_header("Security-Server", server)
        if "sec-agree" not in headers.option_tags(msg.header("Supported")):
            msg.append_header("Supported", "sec-agree")
        return 1

    def _tunnel_for_challenge(self, key: int | Binding, through: int | None, ue: UeSide,
                              offer: secagree.Offer, ck: bytes, ik: bytes, digest: bytes,
                              client: str, txn: bytes) -> str:
        """The Security-Server for this challenge: the tunnel kept, or a new one. Runs under
        the phone's lock; each round is one store transaction (ipsec/challenge.py decides).
        `through`: the spi_pc of the SAs a protected REGISTER came through; when those are
        the pending ones, the phone has switched to them (33.203 7.4): they serve from now on
        and the 401 leaves through them. A new tunnel is staged in the store BEFORE its SAs
        go in, so the store knows every SA that may exist, whatever happens to this worker."""
        pcscf = self._pcscf_host(ue.host)

        def build(lease: Lease) -> Tunnel:
            server = secagree.format_security_server(offer.alg, offer.ealg, lease.spi_pc,
                                                     lease.spi_ps, lease.port_pc, lease.port_ps)
            return Tunnel(lease, ue, offer.alg, offer.ealg, pcscf, digest, client, server, txn)

        def decide(contact: Contact | None, clashes: list[tuple[Tunnel, bool]]):
            return challenge.decide(contact, clashes, ue, digest, txn,
                                    bool(self.params.ipsec_reuse_server_port),
                                    isinstance(key, int))

        def weigh(pressure: flood.Pressure) -> flood.Verdict:
            return flood.weigh(self.limits, pressure)

        avoid: set[int] = set()
        spare: set[int] = set()  # unconfirmed contacts another worker holds the lock of
        evictions = 0
        for _ in range(DUPLICATE_RETRIES + 2 + EVICTION_ROUNDS):
            done = self.store.challenge(key, through, ue, decide, build, avoid, weigh, spare)
            self._retire(done.retired)  # the promoted tunnel's lifetime: the next sweep
            through = None  # promoted (or not) once
            if done.evict:
                evictions += 1
                if evictions > EVICTION_ROUNDS:
                    break
                spare |= self._evict(done.evict)
                continue
            d = done.decision
            if d.action == challenge.REFUSE:
                raise Refused(f"contact {done.contact_id}: {d.reason}")
            if d.action == challenge.KEEP:
                self._info(f"contact {done.contact_id}: keeping tunnel spi-c={d.tunnel.lease.spi_pc}")
                self.counters.count(stat.TUNNELS_KEPT)
                return d.tunnel.security_server
            if d.action == challenge.CLEAR:
                self._remove_tunnels([d.tunnel])
                self._info(f"contact {done.contact_id}: pending tunnel spi-c="
                           f"{d.tunnel.lease.spi_pc} replaced (its SPIs offered again)")
                continue
            record, lease = done.tunnel, done.tunnel.lease
            try:
                kernel.install(self.xfrm, dataclasses.replace(
                    self._kernel_tunnel(pcscf, ue, lease, offer.alg, offer.ealg, ck, ik),
                    lifetime=Lifetime(hard=lifetimes.pending_seconds(
                        self.limits.pending_lifetime, self.lifetime_margin))))
            except XfrmExists as e:
                self.store.release(lease)
                if not _ours(e.what, lease):
                    raise Refused(f"the phone's SAs clash with ones in the kernel "
                                  f"(it must offer new SPIs and ports): {e}") from None
                avoid |= {lease.spi_pc, lease.spi_ps}
                self.log.warn(f"ims-ipsec: SPI already in the kernel, leasing another: {clean(e)}\n")
                continue
            except BaseException:
                self.store.release(lease)
                raise
            if done.replaced is not None:  # a challenge repeated before the phone used the last
                self._remove_tunnels([done.replaced])
            self._info(f"contact {done.contact_id}: tunnel {ue.host} spi-c={lease.spi_pc} "
                       f"spi-s={lease.spi_ps} port-c={lease.port_pc} port-s={lease.port_ps} "
                       f"alg={offer.alg} ealg={offer.ealg}")
            self.counters.count(stat.TUNNELS_CREATED)
            return record.security_server
        if evictions > EVICTION_ROUNDS:
            raise Refused(f"no room after {EVICTION_ROUNDS} rounds of evicting unconfirmed "
                          "tunnels (other workers took the pairs freed)", stat.POOL)
        raise Refused(f"the kernel refused {DUPLICATE_RETRIES} SPI leases as duplicates",
                      stat.KERNEL)

    def _evict(self, victims: tuple[tuple[int, str], ...]) -> set[int]:
        """Unconfirmed contacts out to make room (ipsec/limits.py chose them), each under its
        phone's lock, so that no worker is installing its SAs meanwhile. A lock another
        worker holds is not waited for (two evicting workers would wait for each other):
        that contact is spared and returned, and another is chosen. (Our own phone's lock
        is already held: taking it again is a no-op.)"""
        spared: set[int] = set()
        for contact_id, host in victims:
            with self.locks.try_held(host) as locked:
                if not locked:
                    spared.add(contact_id)
                    continue
                gone = self.store.evict([contact_id])
                if gone:
                    self._remove_tunnels(gone)
                    self.counters.count(stat.REMOVED + stat.UNCONFIRMED, len(gone))
                    self._info(f"contact {contact_id}: unconfirmed tunnel {host} spi-c="
                               f"{gone[0].lease.spi_pc} evicted to make room (limits of "
                               f"pending tunnels, see README: Security model)")
        return spared

    def _kernel_tunnel(self, pcscf: str, ue: UeSide, lease: Lease, alg: str, ealg: str,
                       ck: bytes = bytes(16), ik: bytes = bytes(16)) -> kernel.Tunnel:
        return kernel.Tunnel(pcscf, ue.host, lease.port_pc, lease.port_ps, ue.port_uc,
                             ue.port_us, lease.spi_pc, lease.spi_ps, ue.spi_uc, ue.spi_us,
                             alg, ealg, ck, ik, self.marker)

    def _spec_of(self, t: Tunnel) -> kernel.Tunnel:
        """The kernel identity of a stored tunnel (removal needs no keys)."""
        return self._kernel_tunnel(t.pcscf_host, t.ue, t.lease, t.alg, t.ealg)

    def _remove_tunnels(self, found: list[Tunnel | Lease]) -> None:
        """SAs and policies out of the kernel (one batch for all), then the leases back to
        the pool (one transaction). A kernel refusal leaves the leases for the next sweep."""
        tunnels = [t for t in found if isinstance(t, Tunnel)]
        if tunnels:
            missing = kernel.remove_all(self.xfrm, [self._spec_of(t) for t in tunnels])
            if missing:
                self._info(f"{len(missing)} piece(s) of {len(tunnels)} tunnel(s) were already gone")
        self.store.release_all(t.lease if isinstance(t, Tunnel) else t for t in found)

    def _drop_stale_pending(self, now: float) -> None:
        """Pending tunnels whose phone did not come back through them in PENDING_LIFETIME."""
        stale = self.store.drop_stale_pending(self.limits.pending_lifetime, now)
        if stale:
            self._remove_tunnels([t for _, t in stale])
            self.counters.count(stat.REMOVED + stat.UNCONFIRMED, len(stale))
            for c, t in stale:
                self._info(f"contact {c.id} {c.aor}: pending tunnel spi-c={t.lease.spi_pc} "
                           f"unused for {self.limits.pending_lifetime:.0f} s, removed")

    def _remove_unused(self) -> None:
        self._remove_tunnels(self.store.stale_leases(older_than=STALE_LEASE_AGE, now=self.clock()))

    # -- ipsec_forward --------------------------------------------------------------------------
    @kemi_function
    def ipsec_forward(self, msg: Message, domain: str, flags: int = 0) -> int:
        """Send through the phone's SAs: a request to it, or the replies to its request.

        KEMI cannot change where TM sends a reply once the transaction exists, so for replies
        this is called on the phone's request in the request route, before t_relay; called
        on the reply itself it adds the sec-agree option tags to a 200 OK to REGISTER.
        """
        if not msg.is_request():
            return self._forward_reply(msg)
        if self.is_protected(msg):
            return self._reply_path(msg, flags)
        return self._forward_request(msg, flags)

    def _forward_request(self, msg: Message, flags: int) -> int:
        contact = self.contact_for_request(msg, flags)
        if contact is None or contact.tunnel is None:
            raise Refused(f"no tunnel for {self._search_uri(msg, flags)}")
        t = contact.tunnel
        proto = contact.transport
        if flags & USE_VIA:
            proto = _transport_of(msg.dst_uri() or msg.ruri(), proto)
        if proto != "udp" and flags & TCP_USE_CLIENT_PORT:
            local, remote = t.lease.port_ps, t.ue.port_uc
        else:
            local, remote = t.lease.port_pc, t.ue.port_us
        try:
            msg.set_send_socket(_sock(proto, t.pcscf_host, local))
        except Refused:
            if not (proto == "udp" and flags & UDP_FALLBACK_TCP):
                raise
            proto = "tcp"
            msg.set_send_socket(_sock(proto, t.pcscf_host, local))
        if not (flags & KEEP_DST_URI and msg.dst_uri()):
            msg.set_dst_uri(_uri(t.ue.host, remote, proto))
        return 1

    def _search_uri(self, msg: RequestView, flags: int) -> str:
        if flags & USE_DST_URI and msg.dst_uri():
            return msg.dst_uri()
        return msg.ruri() if flags & USE_NEW_RURI else msg.original_ruri()

    def contact_for_request(self, msg: Message, flags: int = 0) -> Contact | None:
        """The registered phone a request from the core is for (see Store.find_by_uri: the
        contact must own the URI's address, or be of the AoR the request is for). None for a
        URI no phone can have registered (tel:, unreadable): the caller answers as for an
        unknown phone.

        Looked up once per message and flags (`_memoised`): the routing script reads it for
        the record-route of an initial request to a phone, then ipsec_forward again."""
        return self._memoised(msg, f"contact_for_request {flags}",
                              lambda: self._contact_for(msg, flags))

    def _contact_for(self, msg: RequestView, flags: int) -> Contact | None:
        try:
            return self.store.find_by_uri(self._search_uri(msg, flags),
                                          use_alias=not flags & NO_ALIAS,
                                          newest_first=not flags & REVERSE_SEARCH,
                                          aor=_to_aor(msg))
        except SipUriError:
            return None

    def _reply_path(self, msg: Message, flags: int) -> int:
        contact = self.tunnel_contact(msg)
        if contact is None:
            raise Refused(f"{msg.method()} from {msg.source()} did not come through a known tunnel")
        t, src = contact.tunnel, msg.source()
        # for the transaction's replies: which contact and SAs, without looking them up again
        msg.note(NOTE_CONTACT, contact.id)
        msg.note(NOTE_TUNNEL, t.lease.spi_pc)
        if src.proto != "udp":
            return 1  # TCP/TLS replies go back on the phone's connection: port_ps -> port_uc
        remote, local = t.ue.port_us, t.lease.port_pc
        if flags & USE_VIA:
            via = headers.top_via(msg.header("Via"))
            if via.port == t.ue.port_uc:
                remote, local = t.ue.port_uc, t.lease.port_ps
        msg.set_reply_path(_sock("udp", t.pcscf_host, local), _sock("udp", t.ue.host, remote))
        return 1

    def _forward_reply(self, msg: Message) -> int:
        if _noted_tunnel(msg) is None and self.tunnel_contact(msg.request()) is None:
            raise Refused(f"reply to {msg.request().source()}: no tunnel")
        if msg.request().method() == "REGISTER" and 200 <= (msg.status() or 0) < 300:
            for name in ("Supported", "Require"):
                if "sec-agree" not in headers.option_tags(msg.header(name)):
                    msg.append_header(name, "sec-agree")
        return 1

    def phone_facing_rr(self, contact: Contact, proto: str) -> str:
        """The Record-Route address the phone sees (record_route_preset form, host:port;params):
        our protected server port, where its in-dialog requests arrive through SA1. `r2=on`
        marks the double Record-Route so loose_route consumes both of our entries."""
        t = contact.tunnel
        return f"{hostport(t.pcscf_host, t.lease.port_ps)};r2=on" + (
            f";transport={proto}" if proto != "udp" else "")

    # -- Security-Verify ------------------------------------------------------------------------
    def check_security_verify(self, msg: Message, contact: Contact, required: bool) -> int:
        """A protected request's Security-Verify must equal the Security-Server we sent
        through `contact.tunnel` (the SAs it came through: `tunnel_contact`).

        Required on REGISTER (24.229); on other requests checked when present.
        """
        verify = msg.header("Security-Verify")
        if verify is None and not required:
            return 1
        if not secagree.verify_matches(verify, contact.tunnel.security_server):
            self.counters.count(stat.VERIFY_REFUSED)
            self._err(f"contact {contact.id}: Security-Verify {'missing' if verify is None else 'differs'}")
            return -1
        return 1

    # -- ipsec_destroy ------------------------------------------------------------------------
    @kemi_function
    def ipsec_destroy(self, msg: Message, domain: str, aor: str | None = None) -> int:
        """Remove the tunnel(s) of an AoR (default: the R-URI's contact, or for a reply the
        contact its REGISTER came from). On a reply the SAs stay until it has left."""
        if aor:
            found = self.store.find_by_aor(aor)
        elif not msg.is_request():
            c = self.tunnel_contact(msg.request())
            found = [c] if c else []
        else:
            c = self.store.find_by_uri(msg.ruri(), aor=_to_aor(msg))
            found = [c] if c else []
        if not found:
            raise Refused(f"no contact for {aor or msg.ruri()}")
        for c in found:
            self._destroy(c, deferred=not msg.is_request())
        return 1

    @kemi_function
    def ipsec_destroy_by_contact(self, msg: Message, domain: str, aor: str, recv_host: str,
                                 recv_port: int | str) -> int:
        c = self.store.find_by_aor_received(aor, recv_host, int(recv_port))
        if c is None:
            raise Refused(f"no contact {aor} received from {recv_host}:{recv_port}")
        self._destroy(c, deferred=not msg.is_request())
        return 1

    def _destroy(self, contact: Contact, deferred: bool) -> None:
        if deferred:
            # the sweep removes it once the reply through its SAs has left
            self.store.set_registered(contact.id, self.clock() + DEFERRED_TEARDOWN - self.expiry_grace)
            self.store.mark_deregistered(contact.id)
            self._info(f"contact {contact.id} {contact.aor}: tunnel removed after this reply")
            return
        self._teardown(contact)

    def _teardown(self, contact: Contact) -> None:
        removed = self.store.delete_contacts([contact.id])
        self._remove_tunnels(removed)
        self.counters.count(stat.REMOVED + stat.DEREGISTRATION, len(removed))
        self._info(f"contact {contact.id} {contact.aor}: removed")

    # -- housekeeping ---------------------------------------------------------------------------
    def sweep(self) -> int:
        """Expired contacts out, leftover leases out, and a fresh pool once nobody is left."""
        try:
            now = self.clock()
            expired = self.store.expired(now, self.expiry_grace)
            if expired:
                self._remove_expired(expired, now)
            self._drop_stale_pending(now)
            if now - self.unused_checked >= UNUSED_CHECK_EVERY:  # a scan of every lease
                self._remove_unused()
                self.unused_checked = now
            released = self.store.reset_leases_if_empty()
            kernel.remove_all(self.xfrm, [self._spec_of(t) for t in released
                                          if isinstance(t, Tunnel)])
            self._renew_due(now)
            self._publish_gauges()
            self.store.checkpoint()
            return 1
        except Exception as e:  # noqa: BLE001 - a timer callback must not raise into Kamailio
            self._err(f"sweep: {type(e).__name__}: {e}")
            return -1

    def _remove_expired(self, expired: list[Contact], now: float) -> None:
        """Expired contacts out; their tunnels count as de-registered when ipsec_destroy
        doomed them on a reply (`mark_deregistered`), as expired otherwise."""
        dereg = self.store.take_deregistered(c.id for c in expired)
        unconfirmed = {c.id for c in expired if c.state == PENDING and c.id not in dereg}
        for group, cause in (([c for c in expired if c.id in dereg], stat.DEREGISTRATION),
                             ([c for c in expired if c.id in unconfirmed], stat.UNCONFIRMED),
                             ([c for c in expired
                               if c.id not in dereg and c.id not in unconfirmed], stat.EXPIRY)):
            if not group:
                continue
            removed = self.store.delete_contacts([c.id for c in group],
                                                 expired_at=(now, self.expiry_grace))
            self._remove_tunnels(removed)
            self.counters.count(stat.REMOVED + cause, len(removed))
            for c in group:
                what = {stat.DEREGISTRATION: "de-registered",
                        stat.UNCONFIRMED: "never came back through its SAs"}.get(cause, "expired")
                self._info(f"contact {c.id} {c.aor}: {what}, removed")

    def _renew_due(self, now: float) -> None:
        """Kernel lifetimes of the contacts registered, refreshed or re-keyed since the last
        sweep (ipsec/renewals.py). A failure is logged, never a refusal: the registration
        stands and the request stays for the next sweep."""
        try:
            out = renewals.renew_due(self.store, self.xfrm, self.locks, self._spec_of,
                                     self.expiry_grace, self.lifetime_margin, now)
        except (XfrmError, OSError) as e:
            self._err(f"kernel lifetimes not renewed: {e}")
            return
        for c, e in out.refused:
            self._err(f"contact {c.id}: kernel lifetime of tunnel spi-c={c.tunnel.lease.spi_pc} "
                      f"not renewed: {e}")
        for c, gone in out.missing:
            self.log.warn(f"ims-ipsec: contact {c.id}: kernel lifetime of tunnel "
                          f"spi-c={c.tunnel.lease.spi_pc}: {len(gone)} piece(s) not in the "
                          f"kernel ({clean(', '.join(map(str, gone)))})\n")

    def _publish_gauges(self) -> None:
        by_operator = self.store.take_operator_removals()
        if by_operator:
            self.counters.count(stat.REMOVED + stat.OPERATOR, by_operator)
        leased, pairs, active = self.store.usage()
        self.counters.gauge(stat.LEASES_USED, leased)
        self.counters.gauge(stat.LEASES_FREE, max(pairs - leased, 0))
        self.counters.gauge(stat.TUNNELS_ACTIVE, active)

    def startup(self) -> None:
        """Before the fork: keep live tunnels whole in the kernel, flush the rest of ours.

        A restart must not force phones to re-register (the C module flushes everything), so
        the kernel entries of tunnels the store holds as live stay; any of ours that no live
        tunnel explains goes; a live tunnel missing SAs (keys are never stored, so it cannot
        be rebuilt) is dropped, and its phone registers again.
        """
        try:
            live = self.store.live_tunnels()
            if live:
                self._reconcile(live)
            else:
                flushed = self.xfrm.flush(self.marker)
                self._info(f"start: no live tunnel; flushed {flushed}")
            for refused in warm.warm(self.xfrm, self._families(), self.marker):
                self.log.warn(f"ims-ipsec: start: the kernel refuses an SA with {refused}\n")
        except (StoreError, XfrmError, OSError) as e:
            raise ModuleError(f"start-up reconciliation failed: {e}") from None

    def _families(self) -> tuple[int, ...]:
        return tuple(f for f, addr in ((4, self.params.ipsec_listen_addr),
                                       (6, self.params.ipsec_listen_addr6)) if addr)

    def warm(self) -> None:
        """In a worker, before its first message: open its store connection, netlink socket
        and lock descriptor now rather than while a phone waits."""
        self.store.keys_digest(b"", b"")
        # the look-ups every protected request and every phone's reply make, once: their
        # statements prepared and their code's pages this process's own, before a phone
        # waits (make load: each protected-client-port worker's first MT reply came after
        # its phone's retransmission)
        self.store.is_tunnel_flow("0.0.0.0", 0, 0)
        self.store.find_by_flow("0.0.0.0", 0, 0)
        self.xfrm.open()
        self.locks.open()

    def _reconcile(self, live: list[Tunnel]) -> None:
        """Keep the live tunnels the kernel holds whole and exact (4 SAs and 4 policies);
        drop the others (logged: their phones register again); remove our strays. The
        kernel goes first: if the store fails after it, the next start drops them again."""
        plan = reconcile.plan(live, self.xfrm.states(user=self.marker),
                              self.xfrm.policies(user=self.marker), self.marker)
        for t, wrong in plan.dropped:
            self._err(f"start: tunnel spi-c={t.lease.spi_pc} of {t.ue.host} is not whole in the "
                      f"kernel ({'; '.join(wrong)}); dropped, its phone must register again")
            self.counters.count(stat.REMOVED + stat.STARTUP)
        reconcile.apply(self.xfrm, plan)
        self.store.release_all(t.lease for t, _ in plan.dropped)
        # the kept tunnels' kernel lifetimes follow the store again within seconds (those
        # installed before lifetimes existed have none): the sweep serves these requests
        self.store.ask_renewals_of_registered()
        self._info(f"start: kept {len(plan.kept)} live tunnel(s), dropped {len(plan.dropped)}, "
                   f"removed {len(plan.stray_sas)} stray SA(s) and "
                   f"{len(plan.stray_policies)} stray policy(ies)")


def _ours(what: object, lease: Lease) -> bool:
    """Is a duplicate the kernel reported one of OUR SPIs (another lease may help)?"""
    return isinstance(what, SA) and what.spi in (lease.spi_pc, lease.spi_ps)


def _noted_tunnel(msg: Message) -> tuple[int, int] | None:
    """(contact id, spi_pc of the SAs) the transaction's request came through, as
    ipsec_forward noted them in the request route; None where it did not."""
    contact_id, spi = msg.noted(NOTE_CONTACT), msg.noted(NOTE_TUNNEL)
    return (contact_id, spi) if contact_id is not None and spi is not None else None


def _to_aor(msg: RequestView) -> str | None:
    """The AoR a request is for (its To), or None when the To is no SIP URI (tel:, garbage):
    then only the owner of the R-URI's address may take it."""
    try:
        return headers.aor(msg.first_header("To"))
    except (headers.HeaderError, SipUriError):
        return None


def _binding_of(req: RequestView) -> Binding:
    """What an unprotected REGISTER says of its contact (pcscf_save_pending's input)."""
    found = headers.contacts(req.header("Contact"))
    if not found or found[0][0] == "*":
        raise Refused("REGISTER without a contact to protect")
    return Binding(headers.aor(req.first_header("To")), found[0][0],
                   headers.top_via(req.header("Via")), req.source())


def _transaction_key(req: RequestView) -> bytes:
    """The REGISTER transaction a 401 answers, and its place among the phone's REGISTERs:
    Call-ID (8 bytes of a hash), CSeq number (4 bytes), top Via with its branch (4 bytes of
    a hash; RFC 3261 17.2.3 matches transactions on it)."""
    cseq = (req.first_header("CSeq") or "").split()
    number = int(cseq[0]) if cseq and cseq[0].isascii() and cseq[0].isdigit() else 0
    return (_hash(req.first_header("Call-ID"), 8) + min(number, 0xFFFFFFFF).to_bytes(4, "big")
            + _hash(req.first_header("Via"), 4))


def _hash(text: str | None, size: int) -> bytes:
    return hashlib.blake2b((text or "").encode(), digest_size=size).digest()


def _params_of(uri: str, contact_value: str | None) -> dict[str, str] | None:
    """The parameters of the Contact that names `uri` (a 200 OK lists every binding of the
    AoR: this contact's expiry is the one that counts)."""
    want = _same_target(uri)
    for other, params in headers.contacts(contact_value):
        if other != "*" and _same_target(other) == want:
            return params
    return None


def _same_target(uri: str) -> tuple:
    p = parse_uri(uri)
    return (p.user, p.host, p.port)


def _transport_of(uri: str, default: str) -> str:
    try:
        return parse_uri(uri).params.get("transport", default).lower()
    except SipUriError:
        return default
