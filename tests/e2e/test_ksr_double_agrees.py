"""The KSR double answers as real Kamailio 5.6 does: the same probe (ksr_probe.py) is run by
real Kamailio on a real message and by the double on the same text, and must agree."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from esp_net import ADDRS
from pcscf_net import ROOT, _socket
from sip import parse, reply

import ksr_probe

sys.path.insert(0, str(ROOT / "kemi" / "double"))
import KSR  # noqa: E402  the double

HERE = Path(__file__).resolve().parent
PCSCF, UE = ADDRS[4]
REQUEST = (
    f"REGISTER sip:probe@{PCSCF}:5060 SIP/2.0\r\n"
    f"Via: SIP/2.0/UDP {UE}:40999;branch=z9hG4bKprobe1;rport\r\n"
    "Max-Forwards: 70\r\n"
    f"From: <sip:probe@ims.test>;tag=p1\r\nTo: <sip:probe@ims.test>\r\nCall-ID: probe-1\r\n"
    "CSeq: 1 REGISTER\r\n"
    f"Contact: <sip:probe@{UE}:40999>\r\n"
    "Security-Client: ipsec-3gpp;alg=hmac-md5-96;spi-c=1;spi-s=2;port-c=3;port-s=4\r\n"
    "Security-Client: ipsec-3gpp;alg=hmac-sha-1-96;spi-c=5;spi-s=6;port-c=7;port-s=8\r\n"
    "Content-Length: 0\r\n\r\n")


def _real(link, tmp: Path) -> tuple[dict, dict, str]:
    stub = _socket(link.pc, 4, socket.SOCK_DGRAM)
    stub.bind((PCSCF, 6060))
    stub.settimeout(10)
    ue = _socket(link.ue, 4, socket.SOCK_DGRAM)
    ue.bind((UE, 40999))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", link.pc, "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
         "kamailio", "-f", str(HERE / "probe.cfg"), "-DD", "-E", "-Y", str(tmp), "-w", str(tmp),
         "-A", f"PROBE_ADDR={PCSCF}", "-A", f'PROBE_SCRIPT="{HERE / "probe_script.py"}"',
         "-A", f'PROBE_OUT="{tmp}"', "-A", 'PROBE_DEF="x y"'],
        stdout=open(tmp / "kamailio.log", "w"), stderr=subprocess.STDOUT, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not _listening(link) and time.monotonic() < deadline:
            time.sleep(0.2)
        # once: a copy sent again would meet the first one's transaction (t_check_trans 0)
        ue.sendto(REQUEST.encode(), (PCSCF, 5060))
        relayed = parse(stub.recvfrom(65535)[0])
        answer = reply(relayed, 401, "Unauthorized", to_tag="s1")
        answer.add("WWW-Authenticate", 'Digest realm="ims.test", nonce="n", ck="00", ik="11"')
        raw_reply = answer.text()
        stub.sendto(raw_reply.encode(), relayed_via(relayed))
        while not (tmp / "reply.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = (tmp / "kamailio.log").read_text()
        assert (tmp / "reply.json").exists(), log[-3000:]
        return (json.loads((tmp / "request.json").read_text()),
                json.loads((tmp / "reply.json").read_text()), raw_reply)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        stub.close()
        ue.close()


def _listening(link) -> bool:
    """Kamailio's workers read port 5060 (ss in its namespace), so one request suffices."""
    out = subprocess.run(["ip", "netns", "exec", link.pc, "ss", "-Hlun", "sport", "=", ":5060"],
                         capture_output=True, text=True).stdout
    return bool(out.strip())


def relayed_via(msg) -> tuple[str, int]:
    host, _, port = msg.get("Via").split()[1].split(";")[0].partition(":")
    return host, int(port or 5060)


def _double(raw_reply: str) -> tuple[dict, dict]:
    KSR._reset()
    KSR._defines({"PROBE_DEF": '"x y"'})
    KSR._declare_stats("probe_counter", "probe_gauge/no_reset")  # as probe.cfg
    KSR._listen(f"udp:{PCSCF}:5060", f"udp:{PCSCF}:5062")
    KSR._load_request(REQUEST, (UE, 40999, "udp"), (PCSCF, 5060))
    request = ksr_probe.probe_request(KSR, PCSCF, 5062)
    KSR.setdsturi(f"sip:{PCSCF}:6060")
    KSR.tm.t_relay()
    KSR._load_reply(raw_reply, KSR._rec.relays[0], source=(PCSCF, 6060, "udp"))
    return request, ksr_probe.probe_reply(KSR)


def test_the_double_answers_as_kamailio_does(link, tmp_path):
    real_request, real_reply, raw_reply = _real(link, tmp_path)
    double_request, double_reply = _double(raw_reply)
    # JSON turned tuples into lists on the real side: compare in the same shape
    assert json.loads(json.dumps(double_request)) == real_request
    assert json.loads(json.dumps(double_reply)) == real_reply
