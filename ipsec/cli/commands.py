"""Each verb: read the store (ipsec.store) and the kernel (ipsec.xfrm), judge with `views` and
`doctor`, write text or JSON. The outside world comes in as an `Env`, which `main` builds for
real and tests build with a fake kernel, fake /proc files and a clock.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ipsec import tunnel as kernel
from ipsec.algorithms import esp_algs
from ipsec.store import Contact, Lease, Store, StoreError, Tunnel
from ipsec.store.locks import UeLocks
from ipsec.store.records import SchemaMismatch
from ipsec.xfrm import SA, SAId, Selector, XfrmError, XfrmNotFound, del_policy, del_sa, new_sa
from ipsec.xfrm.netns import entered

from . import doctor, render, views
from .config import SIP_PORT, Config
from .errors import CliError, Exit

PROBE_SPI = 0x50524F42  # "PROB": the doctor's throwaway SAs, on documentation addresses
PROBE_ADDRS = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}
PROBE_CK, PROBE_IK = bytes(range(16)), bytes(range(16, 32))
FLUSH_CHUNK = 2000  # deletions between two progress lines
STORE_CHUNK = 500  # leases or contacts per store transaction: a worker never waits long
SETTLE = 1.0  # seconds between the doctor's two looks at drift (the sweep runs every second)
PROC_NET = ("udp", "udp6", "tcp", "tcp6")


def read_proc_net(name: str, netns: str | None) -> str:
    """/proc/net/<name> of this namespace, or of `netns` (read from a thread inside it)."""
    if netns is None:
        return _read_if_any(f"/proc/net/{name}")
    with entered(netns):  # a missing namespace raises here, not below
        return _read_if_any(f"/proc/thread-self/net/{name}")


def _read_if_any(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:  # no IPv6 in this kernel: no udp6/tcp6
        return ""


class Progress:
    """One line rewritten in place on a terminal; nothing when the stream is not one."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled, self.shown = stream, enabled, False

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r{text}\033[K")
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.shown = False


@dataclass
class Env:
    """What a command touches outside itself."""

    config: Config
    xfrm: Any  # ipsec.xfrm.Xfrm, or a fake with batch/states/policies
    out: TextIO
    err: TextIO
    stdin: TextIO
    json: bool = False
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    read_proc: Callable[[str, str | None], str] = read_proc_net
    settle: float = SETTLE
    _store: Store | None = field(default=None, repr=False)

    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.config)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def emit(self, data: dict, text: Callable[[dict], str]) -> None:
        self.out.write(json.dumps(data, indent=2) + "\n" if self.json else text(data))


# -- the store and the kernel, with errors an operator can act on --------------------------

def check_store_file(path: str) -> None:
    """Refuse, with the exit code scripts expect, before SQLite would create or lock anything."""
    no_permission = CliError(Exit.PERMISSION, f"store {path}: no permission (SQLite in WAL "
                             "mode writes next to it even to read): run as root or as "
                             "Kamailio's user")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CliError(Exit.STORE, f"store {path} does not exist: the P-CSCF has not run with "
                       "this store (give its path with --store, or the defines RUN_DIR / "
                       "IPSEC_STORE it runs with)") from None
    except PermissionError:
        raise no_permission from None
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(
            os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
        raise no_permission
    if size == 0:
        raise CliError(Exit.STORE, f"store {path} is empty: the P-CSCF created it but never "
                       "opened it (did it fail at start?)")


def open_store(config: Config) -> Store:
    check_store_file(config.store_path)
    p = config.params
    store = Store(config.store_path, spi_start=p.ipsec_spi_id_start,
                  spi_range=p.ipsec_spi_id_range, client_port=p.ipsec_client_port,
                  server_port=p.ipsec_server_port, max_connections=p.ipsec_max_connections,
                  busy_timeout=10.0)
    try:
        store.get_contact(0)  # opens it: another schema version or a non-database says so
    except SchemaMismatch as e:
        raise CliError(Exit.STORE, f"store {config.store_path}: {e}") from None
    except StoreError as e:
        raise CliError(Exit.STORE, f"{e}") from None
    return store


def store_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StoreError as e:
        raise CliError(Exit.STORE, str(e)) from None


def kernel_error(e: XfrmError) -> CliError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return CliError(Exit.PERMISSION, f"kernel: {e}: reading or changing XFRM needs "
                        "CAP_NET_ADMIN (run as root)")
    return CliError(Exit.PROBLEM, f"kernel: {e}")


def kernel_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except XfrmError as e:
        raise kernel_error(e) from None
    except PermissionError as e:
        raise CliError(Exit.PERMISSION, f"{e}: entering a network namespace needs root") from None
    except FileNotFoundError as e:
        raise CliError(Exit.USAGE, f"no such network namespace ({e.filename})") from None


def kernel_view(env: Env) -> views.KernelView:
    marker = env.config.marker
    return kernel_call(lambda: views.KernelView.of(env.xfrm.states(user=marker),
                                                   env.xfrm.policies(user=marker)))


def find_contacts(env: Env, target: str | None, contact_id: int | None) -> list[Contact]:
    """The contacts `show` / `drop` act on: by id, AoR (or contact URI) or IP address."""
    store = env.store()
    if contact_id is not None:
        found = [c for c in [store_call(lambda: store.get_contact(contact_id))] if c is not None]
    elif views.is_ip(target):
        found = store_call(lambda: store.contacts_matching(**views.phone_query(target)))
    else:
        found = []
        for aor in views.aor_candidates(target):
            found = store_call(lambda: store.contacts_matching(aor=aor))
            if found:
                break
    if not found:
        what = f"id {contact_id}" if contact_id is not None else repr(target)
        raise CliError(Exit.NOT_FOUND, f"no contact matches {what}")
    return found


def list_filter(env: Env, aor: str | None, ip: str | None) -> list[Contact]:
    if ip and not views.is_ip(ip):
        raise CliError(Exit.USAGE, f"--ip {ip!r} is not an IP address")
    store = env.store()
    host = views.phone_query(ip)["host"] if ip else None
    for candidate in views.aor_candidates(aor) if aor else [None]:
        found = store_call(lambda: store.contacts_matching(aor=candidate, host=host))
        if found:
            return found
    return []


# -- the read verbs ----------------------------------------------------------------------------

def cmd_list(env: Env, aor: str | None, ip: str | None) -> int:
    contacts = list_filter(env, aor, ip)
    view = kernel_view(env)
    data = {"store": env.config.store_path, "now": env.clock(),
            **views.list_view(contacts, view, env.config.marker, env.clock())}
    env.emit(data, render.list_text)
    return Exit.OK


def cmd_show(env: Env, target: str | None, contact_id: int | None) -> int:
    contacts = find_contacts(env, target, contact_id)
    view = kernel_view(env)
    data = {"store": env.config.store_path, "now": env.clock(),
            **views.show_view(contacts, view, env.config.marker, env.clock())}
    env.emit(data, render.show_text)
    return Exit.OK


def cmd_stats(env: Env) -> int:
    store = env.store()
    contacts = store_call(store.contacts_matching)
    leases = store_call(store.leases_with_age)
    view = kernel_view(env)
    data = {"store": env.config.store_path, "now": env.clock(),
            **views.stats_view(contacts, leases, env.config.params, view, env.clock())}
    env.emit(data, render.stats_text)
    return Exit.OK


# -- doctor ------------------------------------------------------------------------------------

def probe_esp(env: Env) -> list[doctor.Probe]:
    """Add and remove a throwaway SA (our marker, documentation addresses) per algorithm pair
    and address family in use: the kernel's own answer to "can you do this?"."""
    p = env.config.params
    families = [f for f, addr in ((4, p.ipsec_listen_addr), (6, p.ipsec_listen_addr6)) if addr]
    probes = []
    for fam in families:
        src, dst = PROBE_ADDRS[fam]
        sel = Selector(src, dst, user=env.config.marker)
        gone = del_sa(SAId(dst, PROBE_SPI))
        for alg, ealg in doctor.probe_pairs():
            sa = SA(src, dst, PROBE_SPI, sel, esp_algs(alg, ealg, PROBE_CK, PROBE_IK))
            _, added, removed = kernel_call(lambda: env.xfrm.batch([gone, new_sa(sa), gone]))
            if added is not None and added.errno in (errno.EPERM, errno.EACCES):
                raise kernel_error(added)
            if added is None and removed is not None:
                raise kernel_error(removed)
            probes.append(doctor.Probe(fam, alg, ealg, None if added is None else added.errno,
                                       "" if added is None else str(added),
                                       "" if added is None else added.detail))
    return probes


def listening(env: Env) -> set[tuple[str, str, int]]:
    bound: set[tuple[str, str, int]] = set()
    for name in PROC_NET:
        text = kernel_call(lambda: env.read_proc(name, env.config.netns))
        bound |= doctor.parse_proc_net(text, name.rstrip("6"))
    return bound


def drift(env: Env) -> tuple[int, int, list[doctor.Finding]]:
    """One look at store and kernel: contacts, leases, and what disagrees."""
    store, cfg = env.store(), env.config
    contacts = store_call(store.contacts_matching)
    leases = store_call(store.leases_with_age)
    view = kernel_view(env)
    return len(contacts), len(leases), doctor.drift_findings(
        contacts, leases, view, params=cfg.params, marker=cfg.marker, now=env.clock(),
        grace=cfg.expiry_grace, netns=cfg.netns)


def cmd_doctor(env: Env) -> int:
    """Every check runs, whatever an earlier one found; the exit code is the gravest."""
    cfg = env.config
    findings = doctor.param_findings(cfg.params)
    findings += doctor.esp_findings(probe_esp(env))
    expected = doctor.expected_sockets(cfg.params, cfg.sip_addrs, SIP_PORT, cfg.core)
    findings += doctor.listen_findings(expected, listening(env), cfg.netns)
    code = Exit.OK
    try:
        health = store_call(env.store().health)
        mode = stat.S_IMODE(os.stat(cfg.store_path).st_mode)
        contacts, leases, looked = drift(env)
        findings += doctor.store_findings(cfg.store_path, mode, health, contacts, leases)
        if any(f.check == "drift" and f.severity != doctor.OK for f in looked):
            env.sleep(env.settle)
            looked = doctor.confirmed(looked, drift(env)[2])
        findings += looked
    except CliError as e:
        if e.code not in (Exit.STORE, Exit.PERMISSION):
            raise
        findings.append(doctor.Finding("store", doctor.PROBLEM, str(e),
                                       "fix the store first: drift between store and kernel "
                                       "could not be checked"))
        code = e.code
    data = {"store": cfg.store_path, "now": env.clock(), "worst": doctor.worst(findings),
            "findings": [f.as_dict() for f in findings]}
    env.emit(data, render.doctor_text)
    if code == Exit.PERMISSION:
        return code
    if doctor.has_no_esp(findings):
        return Exit.NO_ESP
    if code != Exit.OK:
        return code
    return Exit.PROBLEM if data["worst"] == doctor.PROBLEM else Exit.OK


# -- the verbs that change something -----------------------------------------------------------

def remove_tunnels(env: Env, freed: Sequence[Tunnel | Lease]) -> dict:
    """The module's teardown: policies then SAs out of the kernel (one batch), then the
    leases back (one transaction). A kernel refusal leaves the leases to the sweep."""
    tunnels = [t for t in freed if isinstance(t, Tunnel)]
    specs = [views.spec_of(t, env.config.marker) for t in tunnels]
    missing = kernel_call(lambda: kernel.remove_all(env.xfrm, specs))
    released = store_call(lambda: env.store().release_all(
        t.lease if isinstance(t, Tunnel) else t for t in freed))
    return {"tunnels": len(tunnels), "pieces_removed": 8 * len(tunnels) - len(missing),
            "pieces_already_gone": len(missing), "leases_released": released}


def cmd_drop(env: Env, target: str | None, contact_id: int | None) -> int:
    """The contacts go under their phones' locks, the ones Kamailio's workers hold while they
    change a phone's tunnels (keyed by the address its REGISTERs come from): a worker
    renewing a tunnel's kernel lifetime reads its policy, then updates it, and an update
    re-adds a policy removed in between (a stray only its lifetime would end); a worker
    re-keying must not see half a drop either. All the locks are taken in stripe order (no
    two droppers can wait for each other; a worker never waits for a second phone's lock
    while it holds one), then one store transaction and one kernel batch."""
    contacts = find_contacts(env, target, contact_id)
    store = env.store()
    locks = UeLocks(env.config.store_path + ".lock")
    hosts = {c.received.host for c in contacts} | {
        t.ue.host for c in contacts for t in (c.tunnel, c.pending) if t is not None}
    try:
        locks.open()
    except OSError as e:
        raise CliError(Exit.PERMISSION, f"cannot open the phones' lock file {locks.path}: "
                       f"{e.strerror} (run as the user Kamailio runs as)") from None
    try:
        with locks.all_held(hosts):
            freed = store_call(lambda: store.delete_contacts([c.id for c in contacts]))
            removed = remove_tunnels(env, freed)
    finally:
        locks.close()
    data = {"dropped": [views.contact_row(c, env.clock(), None, env.config.marker)
                        for c in contacts], **removed}
    store_call(lambda: store.note_operator_removals(data["tunnels"]))  # Kamailio's counter
    env.emit(data, render.drop_text)
    return Exit.OK


def flush_kernel(env: Env, progress: Progress) -> dict[str, int]:
    """Every policy, then every SA, with our marker; dump and delete again until a dump finds
    none (entries added meanwhile). Progress after each chunk: 100,000 SAs take a while."""
    removed = {"policies": 0, "sas": 0}
    steps = (("policies", env.xfrm.policies, lambda p: del_policy(p.id)),
             ("sas", env.xfrm.states, lambda s: del_sa(s.id)))
    for kind, dump, delete in steps:
        while True:
            found = kernel_call(lambda: dump(user=env.config.marker))
            if not found:
                break
            done = 0
            for i in range(0, len(found), FLUSH_CHUNK):
                results = kernel_call(lambda: env.xfrm.batch(
                    [delete(x) for x in found[i:i + FLUSH_CHUNK]]))
                for e in results:
                    if e is not None and not isinstance(e, XfrmNotFound):
                        raise kernel_error(e)
                done += sum(e is None for e in results)
                progress.update(f"flush: {removed[kind] + done:,} of {len(found):,} "
                                f"{'SAs' if kind == 'sas' else kind} removed")
            removed[kind] += done
            if not done:
                raise CliError(Exit.PROBLEM, f"flush: the kernel removed none of {len(found)} "
                               f"{kind} it listed")
    progress.done()
    return removed


def cmd_flush(env: Env, yes: bool) -> int:
    """Every tunnel of this P-CSCF: our kernel entries, leases, contacts (their phones
    register again). Entries of other owners (another marker) stay.

    The kernel goes first, so that no lease is free again while its SAs still exist. Then
    the leases (their contacts lose their tunnels with them), then the contacts: with no
    tunnel left to look after, deleting a contact is one quick statement. Both go in
    bounded transactions, so Kamailio's workers never wait long for the store."""
    store = env.store()
    contacts = store_call(store.contacts_matching)
    leases = store_call(store.leases_with_age)
    if not yes:
        view = kernel_view(env)
        env.err.write(
            f"This removes {len(contacts):,} contact(s) (their phones must register again), "
            f"{view.sa_count:,} SA(s) and {view.policy_count:,} policy(ies) with marker "
            f"{env.config.marker:#x} from the kernel, and {len(leases):,} lease(s) from "
            f"{env.config.store_path}.\nType yes to go on: ")
        env.err.flush()
        if env.stdin.readline().strip().lower() != "yes":
            raise CliError(Exit.NOT_CONFIRMED, "flush: not confirmed, nothing removed "
                           "(--yes skips the question)")
    progress = Progress(env.err, _is_tty(env.err))
    removed = flush_kernel(env, progress)
    released = 0
    records = [r.lease if isinstance(r, Tunnel) else r for r, _ in leases]
    for i in range(0, len(records), STORE_CHUNK):
        released += store_call(lambda: store.release_all(records[i:i + STORE_CHUNK]))
    ids = [c.id for c in contacts]
    freed: list[Tunnel] = []  # tunnels attached since the first look (a phone registering)
    for i in range(0, len(ids), STORE_CHUNK):
        freed += store_call(lambda: store.delete_contacts(ids[i:i + STORE_CHUNK]))
        progress.update(f"flush: {min(i + STORE_CHUNK, len(ids)):,} of {len(ids):,} "
                        "contacts removed")
    progress.done()
    late = remove_tunnels(env, freed) if freed else {"leases_released": 0}
    data = {"contacts": len(ids), "sas": removed["sas"], "policies": removed["policies"],
            "leases_released": released + late["leases_released"]}
    store_call(lambda: store.note_operator_removals(data["leases_released"]))
    env.emit(data, render.flush_text)
    return Exit.OK


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
