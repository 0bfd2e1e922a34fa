"""A load phone (tools/load/phone.py) that also ends its registrations: a de-registration
(REGISTER Expires: 0 through its SAs, the 200 back through them, then its own SAs dropped),
or an expiry (short Expires, its own SAs dropped, and nothing more: the P-CSCF's sweep must
remove the tunnel once expiry + EXPIRY_GRACE has passed)."""
from __future__ import annotations

from tools.load import sip
from tools.load.phone import Phone
from tools.load.ue_ipsec import drop_requests


class SoakPhone(Phone):
    cycles = 0  # cycles this phone finished
    expiring = False  # this cycle ends by expiry
    not_before = 0.0  # monotonic time before which the phone starts no new cycle

    def new_cycle(self, expires: int, expiring: bool) -> None:
        """A new offer (the other client port and SPI pair than the tunnel last used, as a UE
        registering again does) and the Expires this cycle's REGISTERs ask for."""
        self.gen ^= 1
        self.expires = expires
        self.expiring = expiring
        self.tunnel = self.pending = self.previous = None

    # -- the end of a cycle -----------------------------------------------------------------
    def start_end(self) -> None:
        if self.expiring:
            self.step = "expiry: dropping the phone's SAs"
            self.eng.xfrm(drop_requests(self.tunnel), self._on_dropped)
            return
        t = self.tunnel
        self.expires = 0
        self._transact("de-REGISTER", t.port_uc, (t.pcscf, t.port_ps),
                       self._register(self.server), b"REGISTER", self._on_dereg_200)

    def _on_dereg_200(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        if status != 200:
            self.fail(f"de-REGISTER: status {sip.status_line(data)}")
            return
        cause = self._check_arrival(port, addr, self.tunnel)
        if cause:
            self.fail(f"de-REGISTER: 200 {cause}")
            return
        self.step = "de-register: dropping the phone's SAs"
        self.eng.xfrm(drop_requests(self.tunnel), self._on_dropped)

    def _on_dropped(self, error: str | None) -> None:
        if error:
            self.fail(f"{self.step}: {error}")
            return
        self.cycles += 1
        self.done()
