"""The same questions asked of real Kamailio and of the KSR double (kemi/double/KSR.py).

`probe_request` and `probe_reply` take a KSR module and return what it answered, types and
all. Run inside real Kamailio by probe_script.py, and by the test against the double: the two
must agree, so the double cannot drift from what the unit tests assume of Kamailio.
"""
from __future__ import annotations

PVS = ("$rm", "$ru", "$ou", "$du", "$rU", "$si", "$sp", "$pr", "$Ri", "$Rp", "$rs", "$fs",
       "$hdr(Security-Client)", "$(hdr(Security-Client)[*])", "$(hdr(Security-Client)[1])",
       "$hdr(X-Missing)", "$(hdr(X-Missing)[*])", "$avp(probe)")


def probe_request(KSR, pcscf: str, protected_port: int) -> dict:
    out = {pv: KSR.pv.get(pv) for pv in PVS}
    out["is_present(Via)"] = KSR.hdr.is_present("Via")
    out["is_present(X-Missing)"] = KSR.hdr.is_present("X-Missing")
    out["get_def(PROBE_DEF)"] = KSR.kx.get_def("PROBE_DEF")
    out["get_def(NOPE)"] = KSR.kx.get_def("NOPE")
    out["is_myself_ruri"] = KSR.is_myself_ruri()
    out["has_totag"] = KSR.siputils.has_totag()
    out["t_check_trans"] = KSR.tm.t_check_trans()
    out["process_maxfwd"] = KSR.maxfwd.process_maxfwd(10)
    out["set_send_socket(unknown)"] = KSR.corex.set_send_socket(f"udp:{pcscf}:1")
    out["$fs after unknown"] = KSR.pv.get("$fs")
    out["set_send_socket"] = KSR.corex.set_send_socket(f"udp:{pcscf}:{protected_port}")
    out["$fs after set"] = KSR.pv.get("$fs")
    out["seti($avp(probe))"] = KSR.pv.seti("$avp(probe)", 7)
    out["$avp(probe) after seti"] = KSR.pv.get("$avp(probe)")
    out["set_recv_socket"] = KSR.corex.set_recv_socket(f"udp:{pcscf}:{protected_port}")
    out["t_newtran"] = KSR.tm.t_newtran()
    out["t_newtran again"] = KSR.tm.t_newtran()
    out["set_source_address"] = KSR.corex.set_source_address("udp:10.77.0.2:40998")
    out["$Rp, $sp after"] = [KSR.pv.get("$Rp"), KSR.pv.get("$sp")]
    out.update(probe_statistics(KSR))
    return out


def probe_statistics(KSR) -> dict:
    """probe.cfg declares probe_counter and probe_gauge/no_reset (the double: _declare_stats)."""
    st = KSR.statistics
    return {"update_stat(probe_counter, 3)": st.update_stat("probe_counter", 3),
            "update_stat(probe_counter, -1)": st.update_stat("probe_counter", -1),
            "$stat(probe_counter)": KSR.pv.get("$stat(probe_counter)"),
            "update_stat(probe_gauge, 5)": st.update_stat("probe_gauge", 5),
            "reset_stat(probe_counter)": st.reset_stat("probe_counter"),
            "reset_stat(probe_gauge)": st.reset_stat("probe_gauge"),
            "$stat after resets": [KSR.pv.get("$stat(probe_counter)"),
                                   KSR.pv.get("$stat(probe_gauge)")],
            "update_stat(undeclared, 1)": st.update_stat("undeclared", 1),
            "reset_stat(undeclared)": st.reset_stat("undeclared")}


def probe_reply(KSR) -> dict:
    out = {pv: KSR.pv.get(pv) for pv in ("$rs", "$rm", "$hdr(WWW-Authenticate)", "$hdr(X-Missing)",
                                         "$avp(probe)")}
    for pv in ("$si", "$sp", "$pr", "$Rp", "$(hdr(Security-Client)[*])", "$hdr(X-Missing)"):
        out[f"$T_req({pv})"] = KSR.pv.get(f"$T_req({pv})")
    return out
