"""`ims-ipsec` on a live P-CSCF: real Kamailio started with kamailio.cfg, a phone registered
through real ESP. The command line is given the defines Kamailio was started with and its
namespace, and must find the same store, the same sockets and the same SAs."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests" / "unit") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "unit"))

from cli_json import DOCTOR, LIST, SHOW, conforms  # noqa: E402
from ipsec.cli.commands import Env  # noqa: E402
from ipsec.cli.main import main  # noqa: E402
from ipsec.xfrm import Xfrm  # noqa: E402
from pcscf_net import Phone, pcscf_states  # noqa: E402
from checks import through_esp  # noqa: E402


def ims_ipsec(kamailio, *argv: str) -> tuple[int, str]:
    """Run the command line as an operator would on this host: Kamailio's defines, its netns."""
    out = io.StringIO()

    def make_env(config, args) -> Env:
        return Env(config, Xfrm(netns=config.netns), out, io.StringIO(), io.StringIO(),
                   json=args.json)

    defines = [a for n, v in kamailio.defines.items() for a in ("-A", f"{n}={v}")]
    code = main([*defines, "--netns", kamailio.link.pc, *argv], make_env=make_env)
    return code, out.getvalue()


def test_doctor_list_show_and_drop_on_a_live_pcscf(link, scscf, kamailio):
    phone = Phone(link, scscf, user="operator-view")
    phone.full_registration()
    t = phone.tunnel

    code, out = ims_ipsec(kamailio, "doctor", "--json")
    doctor = json.loads(out)
    conforms(doctor, DOCTOR)
    assert code == 0, out
    assert {f["check"] for f in doctor["findings"] if f["severity"] == "ok"} >= {
        "esp", "listen", "store", "drift"}
    listen = next(f["what"] for f in doctor["findings"] if f["check"] == "listen")
    assert listen.startswith("all 16 sockets are bound")  # 5060 + 3 protected ports, v4 + v6

    code, out = ims_ipsec(kamailio, "list", "--aor", phone.aor, "--json")
    contacts = json.loads(out)
    conforms(contacts, LIST)
    (c,) = contacts["contacts"]
    tunnel = c["tunnel"]
    assert (c["state"], tunnel["kernel"]["ok"]) == ("registered", True)
    assert (tunnel["spi_pc"], tunnel["spi_ps"], tunnel["port_pc"], tunnel["port_ps"]) == (
        t.spi_pc, t.spi_ps, t.port_pc, t.port_ps)
    assert (tunnel["spi_uc"], tunnel["spi_us"], tunnel["port_uc"], tunnel["port_us"]) == (
        t.spi_uc, t.spi_us, t.port_uc, t.port_us)

    code, out = ims_ipsec(kamailio, "show", phone.aor, "--json")
    sas = json.loads(out)
    conforms(sas, SHOW)
    rows = {r["sa"]: r for r in sas["contacts"][0]["tunnel"]["sas"]}
    assert rows["SA1"]["packets"] > 0  # the protected REGISTER came in through SA1
    assert rows["SA3"]["packets"] > 0  # its 200 OK went out through SA3

    code, out = ims_ipsec(kamailio, "drop", phone.aor)
    assert code == 0 and "8 SA(s)/policy(ies) removed" in out
    assert not [s for s in pcscf_states(link) if s["dst"] == phone.ip]
    phone.drop_sas(t)
    phone.tunnel = None
    phone.new_offer()
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()  # registers again from scratch and is served
    assert ims_ipsec(kamailio, "doctor")[0] == 0
