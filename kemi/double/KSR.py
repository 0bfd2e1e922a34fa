"""A test double of Kamailio's `KSR` module (app_python3 KEMI), driven by raw SIP text.

Put this directory first on sys.path and `import KSR` finds it. A test loads one message (a
request, or a reply with its transaction's request), runs the routing code, then asserts on
`KSR._rec`: what the script did, in the order it did it.

    KSR._reset()
    KSR._defines({"NEXT_HOP": '"sip:10.0.0.9:5060"'})
    KSR._listen("udp:10.0.0.1:5060", "tcp:10.0.0.1:5060")
    KSR._load_request(raw, source=("10.0.0.2", 5060, "udp"), local=("10.0.0.1", 5060))
    ...run the route...
    KSR._rec.relays[0].dst_uri, KSR._rec.headers(), KSR._rec.logs["err"]

What Kamailio does, the double does (each point is a fact of Kamailio 5.6.3, measured or read
in its source, and exercised against it in the end-to-end tests):
- Reads see the message as received. `hdr.append`/`hdr.remove` only record changes (they are
  lumps in Kamailio, applied when the message is sent); `$hdr`, `hdr.is_present` and
  `$T_req(...)` keep returning the original headers. `_r().headers()` is what would be sent.
- Types: `$rs` int for a reply, None for a request; `$sp`/`$Rp` ints; absent values None.
- `corex.set_send_socket`/`set_recv_socket` return 1 even when no listen socket matches (a
  warning is logged and nothing changes); `set_recv_socket` changes `$Ri`/`$Rp`/`$pr`,
  `set_source_address` changes `$si`/`$sp`.
- The transaction is created by `t_newtran` (or by `t_relay` when none exists): it keeps the
  request as it was then (`$T_req(...)` in a reply route reads that copy) and fixes where its
  replies go from the socket and source of that moment; changing either afterwards is too
  late. `t_newtran` answers 0 for a retransmission of a request whose transaction exists
  (`_load_request(..., retransmission=True)`): TM resent the last reply, the script stops.
- `sl.send_reply` answers through the transaction when one exists, statelessly otherwise.
- AVPs set while a request is routed belong to its transaction: its reply routes read them.
Any KSR function or pseudo-variable not written here raises AttributeError: a test must never
pass because the double quietly accepted a call Kamailio would answer differently.
"""
from __future__ import annotations

import ipaddress
import re
import threading
from dataclasses import dataclass, field, replace

Source = tuple[str, int, str]  # $si, $sp, $pr
Local = tuple[str, int]  # $Ri, $Rp

# Compact header names (RFC 3261 7.3.3 and extensions): Kamailio matches them by header type.
_COMPACT = {"i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
            "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to",
            "v": "via", "o": "event", "u": "allow-events", "r": "refer-to", "x": "session-expires"}


def _canon(name: str) -> str:
    low = name.strip().lower()
    return _COMPACT.get(low, low)


# -- the message ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SipMessage:
    """A SIP message as parsed once on arrival: first line, headers in order, body."""

    first_line: str
    headers: tuple[tuple[str, str], ...]
    body: str

    @property
    def is_request(self) -> bool:
        return not self.first_line.upper().startswith("SIP/")

    @property
    def method(self) -> str:
        if self.is_request:
            return self.first_line.split()[0]
        cseq = self.bodies("CSeq")
        return cseq[0].split()[-1] if cseq else ""

    @property
    def ruri(self) -> str | None:
        return self.first_line.split()[1] if self.is_request else None

    @property
    def status(self) -> int | None:
        return None if self.is_request else int(self.first_line.split()[1])

    def bodies(self, name: str) -> list[str]:
        want = _canon(name)
        return [body for hname, body in self.headers if _canon(hname) == want]


def parse(raw: str) -> SipMessage:
    """First line, headers (folded lines joined, repeated headers kept apart), body."""
    text = raw.replace("\r\n", "\n")
    head, _, body = text.partition("\n\n")
    first, *lines = head.split("\n")
    headers: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += "\r\n" + line.rstrip()
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"KSR double: not a header line: {line!r}")
        headers.append([name.strip(), value.strip()])
    return SipMessage(first.strip(), tuple((n, v) for n, v in headers), body)


@dataclass(frozen=True)
class _View:
    """A message as pseudo-variables see it: parsed text plus the routing state around it."""

    msg: SipMessage
    source: Source
    local: Local
    new_ruri: str | None = None
    dst_uri: str | None = None


@dataclass(frozen=True)
class Reply:
    """A reply the script sent itself (sl_send_reply, send_reply, t_reply, sl_reply_error);
    `stateful`: sent through the transaction (so its retransmissions are answered too)."""

    code: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    stateful: bool = False
    to: str | None = None  # "proto:host:port" it is sent to (see _reply_to); None: unknown


@dataclass(frozen=True)
class Transaction:
    """What TM fixed when it created the transaction: the request's copy, and its replies'
    socket and target (None: back where the request came from, on the socket it arrived on),
    and where they really go (`reply_to`: the target's port only with rport, see _reply_to)."""

    request: "_View"
    reply_socket: str | None
    reply_target: str | None
    reply_to: str | None = None


@dataclass(frozen=True)
class Relay:
    """The state at one t_relay call: where the request goes and what it looks like."""

    ruri: str
    dst_uri: str | None
    send_socket: str | None
    reply_socket: str | None
    reply_target: str | None
    reply_to: str | None
    headers: tuple[tuple[str, str], ...]
    record_route: tuple[tuple[str, str], ...]
    on_reply: str | None
    on_failure: str | None
    request: _View  # the transaction's request, as $T_req(...) will read it
    avps: tuple[tuple[str, object], ...] = ()  # the transaction's AVPs, for its reply routes


@dataclass
class Record:
    """Everything the script did to the current message, for assertions."""

    view: _View | None = None
    request: _View | None = None  # the transaction's request (replies only)
    in_transaction: bool = False
    transaction: Transaction | None = None  # created by t_newtran / t_relay (requests)
    retransmission: bool = False  # a transaction for this request exists already
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewritten: dict[int, str] = field(default_factory=dict)  # header index -> new body
    send_socket: str | None = None
    reply_socket: str | None = None  # set_recv_socket: where TM will send replies from
    reply_target: str | None = None  # set_source_address: where TM will send replies to
    reply_headers: list[tuple[str, str]] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    record_route: list[tuple[str, str]] = field(default_factory=list)
    reply_status: tuple[int, str] | None = None
    on_reply: str | None = None
    on_failure: str | None = None
    avps: dict[str, object] = field(default_factory=dict)  # the transaction's $avp(...)
    relay_result: int = 1
    dropped: bool = False  # KSR.set_drop(): the message goes no further (a reply: not forwarded)
    rport_forced: bool = False  # KSR.force_rport(): replies go to the source port, not Via's
    logs: dict[str, list[str]] = field(
        default_factory=lambda: {"info": [], "warn": [], "err": [], "dbg": []})

    def headers(self) -> list[tuple[str, str]]:
        """The header list the message would leave with: removals and appends applied."""
        gone = {_canon(n) for n in self.removed}
        kept = [(name, self.rewritten.get(i, body))
                for i, (name, body) in enumerate(self.view.msg.headers)
                if _canon(name) not in gone]
        return kept + self.added

    def values(self, name: str) -> list[str]:
        """Bodies of one header in the message as it would leave."""
        return [body for hname, body in self.headers() if _canon(hname) == _canon(name)]

    def log_text(self) -> str:
        return "".join(line for lines in self.logs.values() for line in lines)


# Each Kamailio worker has its own current message: so has each thread here (a test may run
# two "workers" at once). `KSR._rec` is the calling thread's record.
_local = threading.local()


def _r() -> Record:
    rec = getattr(_local, "rec", None)
    if rec is None:
        rec = _local.rec = Record()
    return rec
_defs: dict[str, str] = {}
_sockets: list[tuple[str, str, int]] = []
# statistics: declared variables (modparam "statistics" "variable"), shared by all "workers"
_stats: dict[str, int] = {}
_stats_no_reset: set[str] = set()
_stats_lock = threading.Lock()
# TM's own statistics (tmx): the double has no transaction table across messages, so a test
# sets what TM would count (KSR._tm_stats(active_transactions=...)); 0 until then
_TM_STATS = ("active_transactions",)
_tm: dict[str, int] = dict.fromkeys(_TM_STATS, 0)


def _reset() -> None:
    """Forget everything: message, record, defines, listen sockets."""
    _local.rec = Record()
    _defs.clear()
    _sockets.clear()
    _stats.clear()
    _stats_no_reset.clear()
    _tm.update(dict.fromkeys(_TM_STATS, 0))


def _tm_stats(**values: int) -> None:
    """What TM's statistics read now ($stat(active_transactions), ...)."""
    for name, value in values.items():
        if name not in _tm:
            raise KeyError(f"KSR double: TM has no statistic {name}")
        _tm[name] = int(value)


def _declare_stats(*variables: str) -> None:
    """modparam("statistics", "variable", ...) lines: "name" or "name/no_reset"."""
    for v in variables:
        name, _, flag = v.partition("/")
        _stats[name] = 0
        if flag == "no_reset":
            _stats_no_reset.add(name)


def _defines(values: dict[str, str]) -> None:
    """kamailio.cfg defines as raw text (string values with their quotes, as get_def returns)."""
    _defs.clear()
    _defs.update(values)


def _listen(*sockets: str) -> None:
    """The listen sockets ("proto:host:port"): what set_*_socket and is_myself can match."""
    _sockets.clear()
    _sockets.extend(_socket_key(s) for s in sockets)


def _load_request(raw: str, source: Source = ("10.0.0.2", 5060, "udp"),
                  local: Local = ("10.0.0.1", 5060), *, new_ruri: str | None = None,
                  dst_uri: str | None = None, in_transaction: bool = False,
                  retransmission: bool = False) -> Record:
    """A request arrives. `new_ruri`/`dst_uri`: state an earlier part of the script set;
    `in_transaction`: t_check_trans finds a transaction for it (an ACK to a known INVITE);
    `retransmission`: another worker already created its transaction (t_newtran answers 0)."""
    msg = parse(raw)
    if not msg.is_request:
        raise ValueError("KSR double: _load_request needs a request")
    rec = _local.rec = Record(view=_View(msg, _source(source), local, new_ruri, dst_uri),
                  in_transaction=in_transaction, retransmission=retransmission)
    return rec


def _load_reply(raw: str, request: str | Relay, *,
                request_source: Source = ("10.0.0.2", 5060, "udp"),
                request_local: Local = ("10.0.0.1", 5060),
                source: Source = ("10.0.0.9", 5060, "udp"),
                local: Local = ("10.0.0.1", 5060), in_transaction: bool = True) -> Record:
    """A reply arrives for a transaction: its request is a Relay recorded earlier (as TM
    cloned it at t_relay), or raw text received from `request_source` on `request_local`.
    `in_transaction=False`: it matches none (t_check_trans answers -1; the core would forward
    it statelessly after the reply route)."""
    msg = parse(raw)
    if msg.is_request:
        raise ValueError("KSR double: _load_reply needs a reply")
    avps: dict[str, object] = {}
    if isinstance(request, Relay):
        req, avps = request.request, dict(request.avps)
    else:
        req = _View(parse(raw=request), _source(request_source), request_local)
    rec = _local.rec = Record(view=_View(msg, _source(source), local), request=req,
                              in_transaction=in_transaction, avps=avps)
    return rec


def _source(src: Source) -> Source:
    host, port, proto = src
    return _host(host), int(port), proto.lower()


def _host(host: str) -> str:
    bare = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        return bare.lower()


def _socket_key(sock: str) -> tuple[str, str, int]:
    """"udp:10.0.0.1:5060" / "tcp:[fd00::1]:5060" -> (proto, host, port)."""
    m = re.fullmatch(r"(?P<proto>[a-z]+):(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+)):(?P<port>\d+)",
                     sock.strip().lower())
    if not m:
        raise ValueError(f"KSR double: not a socket 'proto:host:port': {sock!r}")
    return m["proto"], _host(m["v6"] or m["host"]), int(m["port"])


def _current() -> _View:
    if _r().view is None:
        raise RuntimeError("KSR double: no message loaded (KSR._load_request/_load_reply)")
    return _r().view


def _log(level: str, text: str) -> None:
    _r().logs[level].append(text)


# -- pseudo-variables ----------------------------------------------------------------------

_T_REQ = re.compile(r"\$T_req\((?P<inner>.+)\)")
_AVP = re.compile(r"\$avp\((?P<name>[A-Za-z0-9_]+)\)")
_STAT = re.compile(r"\$stat\((?P<name>[A-Za-z0-9_]+)\)")
_HDR = re.compile(r"\$hdr\((?P<name>[^()]+)\)")
_HDR_INDEX = re.compile(r"\$\(hdr\((?P<name>[^()]+)\)\[(?P<index>\*|-?\d+)\]\)")


def _user_of(uri: str | None) -> str | None:
    if not uri:
        return None
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    user, at, _ = rest.partition("@")
    return user.split(";")[0] or None if at else None


def _eval(view: _View, name: str):
    m = _AVP.fullmatch(name)
    if m:
        return _r().avps.get(m["name"])
    m = _STAT.fullmatch(name)
    if m:
        return _stat(m["name"])
    m = _T_REQ.fullmatch(name)
    if m:
        request = _r().request
        return None if request is None else _eval(request, m["inner"])
    m = _HDR.fullmatch(name)
    if m:
        found = view.msg.bodies(m["name"])
        return found[0] if found else None
    m = _HDR_INDEX.fullmatch(name)
    if m:
        found = view.msg.bodies(m["name"])
        if m["index"] == "*":
            return ",".join(found) if found else None
        i = int(m["index"])
        return found[i] if -len(found) <= i < len(found) else None
    msg, req = view.msg, view.msg.is_request
    simple = {
        "$rm": lambda: msg.method,
        "$rs": lambda: msg.status,
        "$ru": lambda: (view.new_ruri or msg.ruri) if req else None,
        "$ou": lambda: msg.ruri if req else None,
        "$rU": lambda: _user_of(view.new_ruri or msg.ruri) if req else None,
        "$du": lambda: view.dst_uri,
        "$si": lambda: view.source[0],
        "$sp": lambda: view.source[1],
        "$pr": lambda: view.source[2],
        "$Ri": lambda: view.local[0],
        "$Rp": lambda: view.local[1],
        "$fs": lambda: _r().send_socket,  # msg->force_send_socket: a reply may have one too
    }
    if name not in simple:
        raise AttributeError(f"KSR double: pseudo-variable {name} is not implemented")
    return simple[name]()


# -- the KSR namespaces --------------------------------------------------------------------

class _Namespace:
    """One KSR sub-module: only the functions given exist; anything else fails loudly."""

    def __init__(self, name: str, **functions) -> None:
        self._name = name
        self.__dict__.update(functions)

    def __getattr__(self, attr: str):
        raise AttributeError(f"KSR.{self._name}.{attr} is not implemented by the KSR double")


def __getattr__(attr: str):
    if attr == "_rec":
        return _r()
    raise AttributeError(f"KSR.{attr} is not implemented by the KSR double")


def _pv_get(name: str):
    m = _STAT.fullmatch(name)
    if m:  # shared memory: no message needed (timer and event routes read it too)
        return _stat(m["name"])
    return _eval(_current(), name)


def _hdr_append(text: str) -> int:
    if not text.endswith("\r\n"):
        raise ValueError(f"KSR double: hdr.append text must end with CRLF: {text!r}")
    name, colon, value = text[:-2].partition(":")
    if not colon or "\r\n" in value:
        raise ValueError(f"KSR double: hdr.append takes one 'Name: value' line: {text!r}")
    _r().added.append((name.strip(), value.strip()))
    return 1


def _hdr_remove(name: str) -> int:
    _current()
    _r().removed.append(name)
    return 1


def _hdr_is_present(name: str) -> int:
    return 1 if _current().msg.bodies(name) else -1


def _hdr_append_to_reply(text: str) -> int:
    name, _, value = text.rstrip("\r\n").partition(":")
    _r().reply_headers.append((name.strip(), value.strip()))
    return 1


def _request_only(what: str) -> _View:
    view = _current()
    if not view.msg.is_request:
        raise RuntimeError(f"KSR double: {what} called on a reply")
    return view


# the transport and sent-by port of a Via value's first entry
_VIA_SENT_BY = re.compile(r"\s*SIP\s*/\s*2\.0\s*/\s*(\w+)\s+(?:\[[^\]]*\]|[^\s;:,]+)(?:\s*:\s*(\d+))?", re.I)
_RPORT = re.compile(r";\s*rport\b", re.I)


def _reply_to() -> str:
    """Where Kamailio sends the current request's replies, sl and TM alike (reply_to_via=0,
    update_sock_struct_from_ip): to the source address as the script left it ($si, which
    set_source_address changes), at the source port only if the top Via has rport or the
    script called force_rport; otherwise at the port the Via's sent-by names (RFC 3261
    18.2.2). Over TCP/TLS the reply goes back on the request's connection."""
    view = _current()
    host, port, proto = view.source
    vias = view.msg.bodies("Via")
    first = vias[0].split(",")[0] if vias else ""
    m = _VIA_SENT_BY.match(first)
    if proto == "udp" and m and not (_r().rport_forced or _RPORT.search(first)):
        port = int(m.group(2)) if m.group(2) else (5061 if m.group(1).lower() == "tls" else 5060)
    return f"{proto}:{host}:{port}"


def _sl_send_reply(code: int, reason: str) -> int:
    _request_only("sl_send_reply")
    _r().replies.append(Reply(int(code), reason, tuple(_r().reply_headers), to=_reply_to()))
    return 1


def _send_reply(code: int, reason: str) -> int:
    """sl's send_reply: through the transaction when the request has one."""
    _request_only("send_reply")
    t = _r().transaction
    _r().replies.append(Reply(int(code), reason, tuple(_r().reply_headers), t is not None,
                              t.reply_to if t is not None else _reply_to()))
    return 1


def _create_transaction() -> Transaction:
    if _r().transaction is None:
        _r().transaction = Transaction(_current(), _r().reply_socket, _r().reply_target,
                                       _reply_to())
        _r().in_transaction = True
    return _r().transaction


def _t_newtran() -> int:
    """1: created; 0: a retransmission (TM resent the last reply); -10 (E_SCRIPT): this
    request already has its transaction."""
    _request_only("t_newtran")
    if _r().retransmission:
        return 0
    if _r().transaction is not None:
        return -10
    _create_transaction()
    return 1


def _sl_reply_error() -> int:
    """Kamailio answers with the code of the last internal error; the double records 500."""
    _request_only("sl_reply_error")
    _r().replies.append(Reply(500, "Server Internal Error", tuple(_r().reply_headers),
                              to=_reply_to()))
    return 1


def _t_relay() -> int:
    view = _request_only("t_relay")
    t = _create_transaction()
    _r().relays.append(Relay(
        ruri=view.new_ruri or view.msg.ruri, dst_uri=view.dst_uri,
        send_socket=_r().send_socket, reply_socket=t.reply_socket,
        reply_target=t.reply_target, reply_to=t.reply_to, headers=tuple(_r().headers()),
        record_route=tuple(_r().record_route), on_reply=_r().on_reply,
        on_failure=_r().on_failure, request=t.request, avps=tuple(_r().avps.items())))
    return _r().relay_result


def _t_on_reply(route: str) -> int:
    _r().on_reply = route
    return 1


def _t_on_failure(route: str) -> int:
    _r().on_failure = route
    return 1


def _t_reply(code: int, reason: str) -> int:
    """A reply TM sends for the transaction (from a failure route, after a reply, or in the
    request route after t_newtran)."""
    if _r().request is None and _r().transaction is None:
        raise RuntimeError("KSR double: t_reply without a transaction")
    t = _r().transaction
    _r().replies.append(Reply(int(code), reason, tuple(_r().reply_headers), True,
                              t.reply_to if t is not None else None))
    return 1


def _pv_seti(name: str, value: int) -> int:
    m = _AVP.fullmatch(name)
    if not m:
        raise AttributeError(f"KSR double: pv.seti({name}) is not implemented")
    _r().avps[m["name"]] = int(value)
    return 1


def _t_check_trans() -> int:
    """1: a CANCEL's or ACK's INVITE transaction exists (`in_transaction`); 0: a retransmission
    of any other request whose transaction exists (TM resent its last reply, the script
    stops); -1: none."""
    view = _current()
    if (_r().retransmission and view.msg.is_request
            and view.msg.method.upper() not in ("ACK", "CANCEL")):
        return 0
    return 1 if _r().in_transaction else -1


def _match_socket(sock: str) -> tuple[str, str, int] | None:
    key = _socket_key(sock)
    if not _sockets:
        raise RuntimeError("KSR double: no listen sockets configured (KSR._listen)")
    if key in _sockets:
        return key
    _log("warn", f"no socket found to match [{sock}]\n")
    return None


def _set_send_socket(sock: str) -> int:
    if _match_socket(sock) is not None:
        _r().send_socket = sock
    return 1


def _set_recv_socket(sock: str) -> int:
    key = _match_socket(sock)
    if key is not None:
        proto, host, port = key
        view = _current()
        _r().reply_socket = sock
        _r().view = replace(view, local=(host, port), source=(*view.source[:2], proto))
    return 1


def _set_source_address(addr: str) -> int:
    _, host, port = _socket_key(addr)
    view = _current()
    _r().reply_target = addr
    _r().view = replace(view, source=(host, port, view.source[2]))
    return 1


def _setdsturi(uri: str) -> int:
    _r().view = replace(_current(), dst_uri=uri)
    return 1


def _uri_hostport(uri: str) -> tuple[str, int | None]:
    m = re.match(r"\s*<?sips?:(?:[^@;>]*@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:;>]+))"
                 r"(?::(?P<port>\d+))?", uri, re.I)
    if not m:
        raise ValueError(f"KSR double: cannot read the host of {uri!r}")
    return _host(m["v6"] or m["host"]), int(m["port"]) if m["port"] else None


def _is_myself(uri: str) -> bool:
    """False for a URI Kamailio cannot parse (check_self answers no)."""
    try:
        host, port = _uri_hostport(uri)
    except ValueError:
        return False
    return any(h == host and (port or 5060) == p for _, h, p in _sockets)


def _is_myself_ruri() -> int:
    view = _request_only("is_myself_ruri")
    return 1 if _is_myself(view.new_ruri or view.msg.ruri) else -1


def _has_totag() -> int:
    to = _current().msg.bodies("To")
    return 1 if to and re.search(r";\s*tag\s*=", to[0], re.I) else -1


def _loose_route() -> int:
    """Route headers: drop the top one when it is ours (and the next one too when both carry
    r2=on, double Record-Route); the next one left becomes the destination."""
    view = _request_only("loose_route")
    routes = [r.strip() for body in view.msg.bodies("Route") for r in body.split(",")]
    if not routes:
        return -1
    try:
        _uri_hostport(routes[0])
    except ValueError:
        return -1  # rr cannot parse the top Route's URI: an error, nothing changed
    if _is_myself(routes[0]):
        double = "r2=on" in routes.pop(0).lower()
        if double and routes and _is_myself(routes[0]):
            routes.pop(0)
        _r().removed.append("Route")
        _r().added.extend(("Route", r) for r in routes)
    if routes:
        _r().view = replace(_r().view, dst_uri=routes[0].strip("<>").split(">")[0])
    return 1


def _record_route_preset(addr: str, addr2: str) -> int:
    _request_only("record_route_preset")
    _r().record_route.append((addr, addr2))
    return 1


def _add_path() -> int:
    """Path with the address of the socket the request will leave from (Kamailio fills it in
    at send time: the forced send socket, else the first listen socket of its protocol)."""
    view = _request_only("add_path")
    if _r().send_socket is not None:
        _, host, port = _socket_key(_r().send_socket)
    else:
        _, host, port = next(s for s in _sockets if s[0] == view.source[2])
    shown = f"[{host}]" if ":" in host else host
    _r().added.append(("Path", f"<sip:{shown}:{port};lr>"))
    return 1


MAXFWD_MAX_LIMIT = 70  # the maxfwd module's max_limit parameter (default)


def _process_maxfwd(limit: int) -> int:
    """2: header added with `limit`; 1: decremented (values above the module's max_limit
    first lowered to it); -1: it was 0 (too many hops); -2: not a number (maxfwd's error)."""
    view = _request_only("process_maxfwd")
    for i, (name, body) in enumerate(view.msg.headers):
        if _canon(name) == "max-forwards":
            if not re.fullmatch(r"[0-9]{1,3}", body.strip()) or int(body) > 255:
                return -2
            value = int(body)
            if value == 0:
                return -1
            _r().rewritten[i] = str(min(value, MAXFWD_MAX_LIMIT + 1) - 1)
            return 1
    _r().added.append(("Max-Forwards", str(limit)))
    return 2


def _stat(name: str) -> int | None:
    """$stat(name): a declared variable, else one of TM's, else None (no such statistic)."""
    with _stats_lock:
        if name in _stats:
            return _stats[name]
    return _tm.get(name)


def _update_stat(name: str, value: int) -> int:
    """statistics.update_stat: an undeclared variable is an error line and -1, as in 5.6.3."""
    with _stats_lock:
        if name not in _stats:
            _log("err", f"variable <{name}> not defined\n")
            return -1
        _stats[name] += int(value)
    return 1


def _reset_stat(name: str) -> int:
    with _stats_lock:
        if name not in _stats:
            _log("err", f"variable <{name}> not defined\n")
            return -1
        if name not in _stats_no_reset:
            _stats[name] = 0
    return 1


def _change_reply_status(code: int, reason: str) -> int:
    if _current().msg.is_request:
        raise RuntimeError("KSR double: change_reply_status called on a request")
    _r().reply_status = (int(code), reason)
    return 1


def _drop() -> int:
    _r().dropped = True
    return 0


pv = _Namespace("pv", get=_pv_get, seti=_pv_seti)
hdr = _Namespace("hdr", append=_hdr_append, remove=_hdr_remove, is_present=_hdr_is_present,
                 append_to_reply=_hdr_append_to_reply)
sl = _Namespace("sl", sl_send_reply=_sl_send_reply, send_reply=_send_reply,
                sl_reply_error=_sl_reply_error)
tm = _Namespace("tm", t_relay=_t_relay, t_on_reply=_t_on_reply, t_on_failure=_t_on_failure,
                t_reply=_t_reply, t_check_trans=_t_check_trans, t_newtran=_t_newtran)
corex = _Namespace("corex", set_send_socket=_set_send_socket, set_recv_socket=_set_recv_socket,
                   set_source_address=_set_source_address)
rr = _Namespace("rr", loose_route=_loose_route, record_route_preset=_record_route_preset)
path = _Namespace("path", add_path=_add_path)
siputils = _Namespace("siputils", has_totag=_has_totag)
maxfwd = _Namespace("maxfwd", process_maxfwd=_process_maxfwd)
textopsx = _Namespace("textopsx", change_reply_status=_change_reply_status)
kx = _Namespace("kx", get_def=lambda name: _defs.get(name, ""))
set_drop = _drop
statistics = _Namespace("statistics", update_stat=_update_stat, reset_stat=_reset_stat)
setdsturi = _setdsturi
is_myself_ruri = _is_myself_ruri


def is_myself(uri: str) -> int:
    """KSR.is_myself: 1 when the URI's host:port is one of our listen sockets, else -1."""
    try:
        return 1 if _is_myself(uri) else -1
    except ValueError:
        return -1


def force_rport() -> bool:
    """As the core's: replies to this request go to its source address and port."""
    _r().rport_forced = True
    return True


def info(text: str) -> None:
    _log("info", text)


def warn(text: str) -> None:
    _log("warn", text)


def err(text: str) -> None:
    _log("err", text)


def dbg(text: str) -> None:
    _log("dbg", text)
