"""Plain aligned text from the rows of `views` and `doctor` (JSON is those rows as they are)."""
from __future__ import annotations

import time
from collections.abc import Sequence

from ipsec.sipuri import hostport

MAX_PER_CHECK = 50  # a doctor check with more findings prints this many (JSON has them all)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "".join(f"{indent}{line}\n" for line in lines)


def duration(seconds: float) -> str:
    s = int(abs(seconds))
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m"), (s % 60, "s")]
    text = "".join(f"{n}{u}" for n, u in [(n, u) for n, u in parts if n][:2]) or "0s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def addr(a: dict) -> str:
    return f"{a['proto']} {hostport(a['host'], a['port'])}"


def kernel_word(k: dict | None) -> str:
    if k is None:
        return "-"
    if k["ok"]:
        return "ok"
    words = []
    if k["missing"]:
        words.append(f"{4 - k['sas']} SA/{4 - k['policies']} pol missing")
    if k["differs"]:
        words.append(f"{len(k['differs'])} differ")
    return ", ".join(words)


# -- list --------------------------------------------------------------------------------------

LIST_HEADERS = ("ID", "AOR", "RECEIVED", "STATE", "EXPIRES", "TUNNEL", "SPI PC/PS", "PORT PC/PS",
                "UE SPI UC/US", "UE PORT UC/US", "ALG/EALG", "KERNEL")


def _tunnel_cells(t: dict | None, role: str) -> list[object]:
    if t is None:
        return ["none", None, None, None, None, None, None]
    return [role, f"{t['spi_pc']}/{t['spi_ps']}", f"{t['port_pc']}/{t['port_ps']}",
            f"{t['spi_uc']}/{t['spi_us']}", f"{t['port_uc']}/{t['port_us']}",
            f"{t['alg']}/{t['ealg']}", kernel_word(t["kernel"])]


def list_text(data: dict) -> str:
    rows = []
    tunnels = 0
    for c in data["contacts"]:
        head = [c["id"], c["aor"], addr(c["received"]), c["state"], duration(c["expires_in"])]
        tunnels_of = [(t, role) for t, role in ((c["tunnel"], "in use"), (c["pending"], "pending"))
                      if t is not None]
        tunnels += len(tunnels_of)
        if not tunnels_of:
            rows.append(head + _tunnel_cells(None, ""))
        for i, (t, role) in enumerate(tunnels_of):
            rows.append((head if i == 0 else [""] * len(head)) + _tunnel_cells(t, role))
    if not rows:
        return "no contacts\n"
    return table(LIST_HEADERS, rows) + f"{len(data['contacts'])} contact(s), {tunnels} tunnel(s)\n"


# -- show --------------------------------------------------------------------------------------

def _algs(r: dict) -> str:
    return " ".join(a for a in (r["auth"], r["crypt"], r["aead"]) if a)


def _flow(r: dict) -> str:
    return f"{hostport(r['src'], r['sport'])} -> {hostport(r['dst'], r['dport'])}"


def _state(r: dict) -> str:
    return "MISSING" if not r["present"] else "DIFFERS" if r["differences"] else "ok"


def _tunnel_block(t: dict, title: str) -> str:
    k = t["kernel"]
    out = (f"  {title}: ours spi-c {t['spi_pc']} spi-s {t['spi_ps']} port-c {t['port_pc']} "
           f"port-s {t['port_ps']} on {t['pcscf']}; phone spi-c {t['spi_uc']} spi-s "
           f"{t['spi_us']} port-c {t['port_uc']} port-s {t['port_us']} on {t['ue']}; "
           f"alg {t['alg']} ealg {t['ealg']}; kernel {kernel_word(k)}\n")
    out += table(("SA", "FLOW", "SPI", "REQID", "ALGORITHMS", "PACKETS", "BYTES", "REPLAY",
                  "INTEGRITY-FAILED", "KERNEL"),
                 [(r["sa"], _flow(r), r["spi"], r["reqid"], _algs(r), r["packets"], r["bytes"],
                   r["replay"], r["integrity_failed"], _state(r)) for r in t["sas"]], "    ")
    out += table(("POLICY", "DIR", "FLOW", "REQID", "INDEX", "KERNEL"),
                 [(r["sa"], r["dir"], _flow(r), r["reqid"], r["index"], _state(r))
                  for r in t["policies"]], "    ")
    for r in [*t["sas"], *t["policies"]]:
        for d in r["differences"]:
            out += f"    {r['sa']} {'policy ' + r['dir'] if 'dir' in r else 'SA'}: {d}\n"
    return out


def show_text(data: dict) -> str:
    out = []
    for c in data["contacts"]:
        text = (f"contact {c['id']}  {c['aor']}\n"
                f"  uri       {c['uri']} (requests to it over {c['transport']})\n"
                f"  received  {addr(c['received'])}   via {addr(c['via'])}\n"
                f"  state     {c['state']}, expires {when(c['expires'])} "
                f"({duration(c['expires_in'])})\n")
        if c["tunnel"] is None and c["pending"] is None:
            text += "  no tunnel\n"
        for t, title in ((c["tunnel"], "tunnel in use"), (c["pending"], "pending tunnel")):
            if t is not None:
                text += _tunnel_block(t, title)
        out.append(text)
    return "\n".join(out)


# -- stats -------------------------------------------------------------------------------------

def stats_text(data: dict) -> str:
    c, t, s, k = data["contacts"], data["tunnels"], data["spi_pairs"], data["kernel"]
    out = (f"contacts    {c['total']} (registered {c['registered']}, pending {c['pending']}, "
           f"past expiry {c['expired']})\n"
           f"tunnels     {t['total']} (in use {t['in_use']}, pending {t['pending']}, "
           f"unattached {t['unattached']}, leased only {t['leased_only']})\n"
           f"SPI pairs   {s['used']} of {s['total']} used, {s['free']} free "
           f"(from SPI {s['first_spi']})\n")
    if k is not None:
        out += f"kernel      {k['sas']} SA(s), {k['policies']} policy(ies) with our marker\n"
    out += "port pairs\n" + table(
        ("INDEX", "PORT-C", "PORT-S", "TUNNELS"),
        [("other" if p["index"] is None else p["index"], p["port_pc"], p["port_ps"],
          p["tunnels"]) for p in data["port_pairs"]], "  ")
    return out


# -- doctor ------------------------------------------------------------------------------------

def doctor_text(data: dict) -> str:
    out = []
    shown: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for f in data["findings"]:
        n = shown.get(f["check"], 0)
        if f["severity"] != "ok" and n >= MAX_PER_CHECK:
            hidden[f["check"]] = hidden.get(f["check"], 0) + 1
            continue
        shown[f["check"]] = n + 1
        out.append(f"{f['severity']:<8} {f['check']:<10} {f['what']}\n")
        if f["fix"] and f["severity"] != "ok":
            out.append(f"{'':<19} fix: {f['fix']}\n")
    for check, n in hidden.items():
        out.append(f"{'':<8} {check:<10} ... and {n} more (--json lists them all)\n")
    count = {s: sum(f["severity"] == s for f in data["findings"]) for s in ("problem", "warning")}
    out.append(f"doctor: {count['problem']} problem(s), {count['warning']} warning(s)\n")
    return "".join(out)


# -- drop, flush -------------------------------------------------------------------------------

def drop_text(data: dict) -> str:
    out = [f"dropped contact {c['id']} {c['aor']} ({addr(c['received'])})\n"
           for c in data["dropped"]]
    out.append(f"{data['tunnels']} tunnel(s): {data['pieces_removed']} SA(s)/policy(ies) removed "
               f"from the kernel, {data['pieces_already_gone']} already gone; "
               f"{data['leases_released']} lease(s) released\n")
    return "".join(out)


def flush_text(data: dict) -> str:
    return (f"flushed: {data['contacts']} contact(s), {data['sas']} SA(s), "
            f"{data['policies']} policy(ies), {data['leases_released']} lease(s) released\n")
