"""relay.cfg's request route in KEMI Python, for tools/load/kemi_relay.cfg."""
import KSR


def mod_init():
    return kamailio()


class kamailio:
    def __init__(self):
        self.next_hop = KSR.kx.get_def("NEXT_HOP").strip('"')

    def child_init(self, rank):
        return 0

    def ksr_request_route(self, msg):
        if KSR.is_method("OPTIONS") and KSR.pv.get("$rU") is None:
            KSR.sl.sl_send_reply(200, "OK")
            return 1
        if KSR.is_method("REGISTER"):
            KSR.path.add_path()
        KSR.setdsturi(self.next_hop)
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()
        return 1

    def ksr_reply_route(self, msg):
        return 1
