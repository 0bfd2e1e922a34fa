"""Where the store is and what the parameters are, found the way the P-CSCF finds them.

The P-CSCF reads kamailio.cfg's defines (`Params.from_defines`, `Module.from_defines`); the
command line reads the same names, in this order of precedence: `--define NAME=VALUE` (as
`kamailio -A`), then the `#!define` lines of `--cfg FILE` (the operator's kamailio.cfg), then
the defaults written in this project's kamailio.cfg (`DEFAULTS`, checked against that file by
a unit test). `--store PATH` overrides the store path derived from IPSEC_STORE and RUN_DIR.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ipsec.params import Params, ParamError
from ipsec.tunnel import MARKER

# kamailio.cfg's `#!define` defaults, as written there (strings keep their quotes).
DEFAULTS: dict[str, str] = {
    "PCSCF_IP": "127.0.0.1",
    "NEXT_HOP": '"sip:127.0.0.1:6060"',
    "IPSEC_LISTEN_ADDR": '"127.0.0.1"',
    "IPSEC_LISTEN_ADDR6": '""',
    "IPSEC_CLIENT_PORT": "5062",
    "IPSEC_SERVER_PORT": "5063",
    "IPSEC_MAX_CONNECTIONS": "2",
    "IPSEC_REUSE_SERVER_PORT": "1",
    "IPSEC_SPI_ID_START": "100",
    "IPSEC_SPI_ID_RANGE": "1000",
    "IPSEC_PREFERRED_ALG": '""',
    "IPSEC_PREFERRED_EALG": '""',
    "IPSEC_LISTEN_NAME": '""',
    "IPSEC_LISTEN_AGNAME": '""',
    "IPSEC_STORE": '""',
    "RUN_DIR": '"/var/run/kamailio"',
    "EXPIRY_GRACE": "30",
    "LIFETIME_MARGIN": "60",
    "CHILDREN": "4",
    "IPSEC_CHILDREN": "1",
    "TCP_LIFETIME": "120",
    "PENDING_LIFETIME": "30",
    "PENDING_PER_HOST": "8",
    "PENDING_PER_AOR": "4",
    "REKEY_RESERVE": "10",
    "OVERLOAD_TRANSACTIONS": "1000",
    "CORE_PORT": "5060",  # the core socket's port, when CORE_IP gives the core one
}
SIP_PORT = 5060  # kamailio.cfg's unprotected listen lines
STORE_FILE = "ipsec-pcscf.sqlite"

_DEFINE_LINE = re.compile(r"^\s*#!(?:define|trydef)\s+([A-Za-z_][A-Za-z0-9_]*)(?:\s+(.*?))?\s*$")


class ConfigError(ValueError):
    """The options or defines cannot describe a P-CSCF (a usage error)."""


def cfg_defines(text: str) -> dict[str, str]:
    """The `#!define NAME VALUE` lines of a kamailio.cfg; the first definition of a name wins,
    as with kamailio.cfg's `#!ifndef` guards (a define given on the command line first)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = _DEFINE_LINE.match(line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2) or ""
    return found


def parse_define(option: str) -> tuple[str, str]:
    """NAME=VALUE as `kamailio -A` takes it (NAME alone defines it empty)."""
    name, _, value = option.partition("=")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"--define {option!r}: expected NAME=VALUE")
    return name, value.strip()


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


@dataclass(frozen=True)
class Config:
    """What the command line knows of the P-CSCF it looks at."""

    params: Params
    store_path: str
    expiry_grace: float
    sip_addrs: tuple[str, ...]  # unprotected listen addresses (PCSCF_IP, PCSCF_IP6), port 5060
    netns: str | None = None
    marker: int = MARKER
    core: tuple[str, int] | None = None  # the core socket (CORE_IP, CORE_PORT), if any

    @classmethod
    def build(cls, defines: dict[str, str], *, store: str | None = None,
              netns: str | None = None) -> "Config":
        """`defines`: every define the P-CSCF would see (DEFAULTS overlaid by cfg and -A)."""
        get = lambda name: defines.get(name, "")  # noqa: E731
        try:
            params = Params.from_defines(get)
        except ParamError as e:
            raise ConfigError(str(e)) from None
        run_dir = unquote(get("RUN_DIR")) or "/var/run/kamailio"
        path = store or params.ipsec_store or os.path.join(run_dir, STORE_FILE)
        try:
            grace = float(unquote(get("EXPIRY_GRACE")) or 30)
        except ValueError:
            raise ConfigError(f"EXPIRY_GRACE: {get('EXPIRY_GRACE')!r} is not a number") from None
        sip = tuple(unquote(get(n)).strip("[]") for n in ("PCSCF_IP", "PCSCF_IP6")
                    if unquote(get(n)))
        core = None
        if unquote(get("CORE_IP")):
            port = unquote(get("CORE_PORT")) or str(SIP_PORT)
            if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"CORE_PORT: {port!r} is not a port")
            core = (unquote(get("CORE_IP")).strip("[]"), int(port))
        return cls(params, path, grace, sip, netns, core=core)


def defines_from(cfg_text: str | None, options: list[str]) -> dict[str, str]:
    """DEFAULTS, overlaid by a kamailio.cfg's defines, overlaid by `--define` options."""
    values = dict(DEFAULTS)
    if cfg_text is not None:
        values.update(cfg_defines(cfg_text))
    for option in options:
        name, value = parse_define(option)
        values[name] = value
    return values
