"""KEMI script run by real Kamailio for test_ksr_double_agrees.py: asks ksr_probe's questions
and writes the answers (JSON) where the PROBE_OUT define says."""
import json
import os

import KSR

import ksr_probe


def _write(name, data):
    out = KSR.kx.get_def("PROBE_OUT").strip('"')
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(data, f)
    os.rename(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def mod_init():
    return kamailio()


class kamailio:
    def child_init(self, rank):
        return 0

    def ksr_request_route(self, msg):
        pcscf = KSR.kx.get_def("PROBE_ADDR")
        _write("request.json", ksr_probe.probe_request(KSR, pcscf, 5062))
        KSR.setdsturi("sip:%s:6060" % pcscf)
        KSR.tm.t_on_reply("ksr_probe_reply")
        KSR.tm.t_relay()
        return 1

    def ksr_probe_reply(self, msg):
        _write("reply.json", ksr_probe.probe_reply(KSR))
        return 1

    def ksr_reply_route(self, msg):
        return 1
