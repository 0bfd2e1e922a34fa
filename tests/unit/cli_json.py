"""The JSON shapes of `ims-ipsec --json` as the README documents them, and a checker."""
from __future__ import annotations

from typing import Any


class Opt:
    """A value of this shape, or null."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


ADDR = {"host": str, "port": int, "proto": str}
KERNEL = {"ok": bool, "sas": int, "policies": int, "missing": [str], "differs": [str]}
TUNNEL = {"role": str, "pcscf": str, "ue": str, "spi_pc": int, "spi_ps": int, "port_pc": int,
          "port_ps": int, "spi_uc": int, "spi_us": int, "port_uc": int, "port_us": int,
          "alg": str, "ealg": str, "kernel": Opt(KERNEL)}
SA_ROW = {"sa": str, "src": str, "sport": int, "dst": str, "dport": int, "spi": int,
          "reqid": int, "auth": Opt(str), "crypt": Opt(str), "aead": Opt(str), "present": bool,
          "differences": [str], "packets": Opt(int), "bytes": Opt(int), "replay": Opt(int),
          "integrity_failed": Opt(int), "add_time": Opt(int), "use_time": Opt(int)}
POLICY_ROW = {"sa": str, "dir": str, "src": str, "sport": int, "dst": str, "dport": int,
              "reqid": int, "present": bool, "differences": [str], "index": Opt(int),
              "add_time": Opt(int), "use_time": Opt(int)}
TUNNEL_DETAIL = {**TUNNEL, "sas": [SA_ROW], "policies": [POLICY_ROW]}
CONTACT = {"id": int, "aor": str, "uri": str, "transport": str, "received": ADDR, "via": ADDR, "state": str,
           "expires": float, "expires_in": float, "tunnel": Opt(TUNNEL), "pending": Opt(TUNNEL)}
CONTACT_DETAIL = {**CONTACT, "tunnel": Opt(TUNNEL_DETAIL), "pending": Opt(TUNNEL_DETAIL)}
LIST = {"store": str, "now": float, "contacts": [CONTACT]}
SHOW = {"store": str, "now": float, "contacts": [CONTACT_DETAIL]}
STATS = {"store": str, "now": float,
         "contacts": {"total": int, "pending": int, "registered": int, "expired": int},
         "tunnels": {"total": int, "in_use": int, "pending": int, "unattached": int,
                     "leased_only": int},
         "spi_pairs": {"first_spi": int, "total": int, "used": int, "free": int},
         "port_pairs": [{"index": Opt(int), "port_pc": int, "port_ps": int, "tunnels": int}],
         "kernel": Opt({"sas": int, "policies": int})}
DOCTOR = {"store": str, "now": float, "worst": str,
          "findings": [{"check": str, "severity": str, "what": str, "fix": str}]}
DROP = {"dropped": [CONTACT], "tunnels": int, "pieces_removed": int, "pieces_already_gone": int,
        "leases_released": int}
FLUSH = {"contacts": int, "sas": int, "policies": int, "leases_released": int}
SEVERITIES = {"ok", "warning", "problem"}
CHECKS = {"params", "esp", "algorithms", "listen", "store", "drift", "sweep"}


def conforms(value: Any, shape: Any, where: str = "$") -> None:
    """Raise AssertionError naming the first place where `value` does not have `shape`:
    a type, {key: shape} (exactly these keys), [shape] (a list of it), or Opt(shape)."""
    if isinstance(shape, Opt):
        if value is not None:
            conforms(value, shape.shape, where)
    elif isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        assert set(value) == set(shape), f"{where}: keys {sorted(value)} != {sorted(shape)}"
        for key, sub in shape.items():
            conforms(value[key], sub, f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            conforms(item, shape[0], f"{where}[{i}]")
    else:
        ok = isinstance(value, shape) and not (shape is int and isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not {shape.__name__}"
