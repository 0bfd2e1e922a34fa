"""`make soak`: many phones through real Kamailio and real ESP, cycle after cycle, then the
proof that nothing leaked and that Kamailio's memory stayed flat.

A cycle is one phone's register (two-step), re-key (new keys, SPIs, client port), MO and MT
MESSAGE, then a de-registration through its SAs or (every Nth cycle) an expiry the sweep must
clean up. The phones, the engine and the S-CSCF stub are tools/load's.

    __main__   the rig, the rounds, the final checks (tests/kernel/invariant.py), the report
    phone      the load phone plus the end of a cycle (de-register or expire)
    memory     per-process PSS samples, the curve, the flatness verdict (pure, unit-tested)
"""
