"""ipsec/counters.py over Kamailio's statistics, and the Prometheus scrape (xhttp_prom).

Kamailio's counters are per process in shared memory and summed when read, so every worker
adds to them without a lock (`KSR.statistics.update_stat`). A gauge is set by the sweep's
timer process only: it adds the difference from the value it set last, so the sum is the
value. Gauges are declared `no_reset` in kamailio.cfg (a `stats.reset_statistics` would
otherwise break that difference).
"""
from __future__ import annotations

import KSR

METRICS_PATH = "/metrics"


class KsrCounters:
    def __init__(self) -> None:
        self._gauges: dict[str, int] = {}  # what this process set last

    def count(self, name: str, n: int = 1) -> None:
        if n:
            KSR.statistics.update_stat(name, n)

    def gauge(self, name: str, value: int) -> None:
        delta = value - self._gauges.get(name, 0)
        if delta:
            KSR.statistics.update_stat(name, delta)
            self._gauges[name] = value


def metrics_request(get_def) -> int:
    """xhttp's event callback: the Prometheus scrape on PROM_PORT, nothing anywhere else.

    xhttp hands this every HTTP request on every TCP socket (the SIP ones and the protected
    ones too): only GET /metrics on the metrics socket is answered with the statistics."""
    port = (get_def("PROM_PORT") or "").strip('"')
    if str(KSR.pv.get("$Rp")) != port:
        KSR.xhttp.xhttp_reply(403, "Forbidden", "text/plain", "not here\n")
        return 1
    if KSR.pv.get("$rm") != "GET" or KSR.pv.get("$hu") != METRICS_PATH:
        KSR.xhttp.xhttp_reply(404, "Not Found", "text/plain", f"GET {METRICS_PATH}\n")
        return 1
    KSR.xhttp_prom.dispatch()
    return 1
