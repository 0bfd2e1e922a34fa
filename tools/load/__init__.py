"""`make load`: a load generator of the project's own, against real Kamailio and real ESP.

N phones (each its own address and ports, K with a step in progress at once) register
through this project's P-CSCF (kamailio.cfg) with sec-agree, send and receive a MESSAGE
through their SAs, then all re-key at once (33.203 7.4); the same phones then register
through a plain relay (relay.cfg) in the same boot, and the rates are compared.

    engine     one epoll loop, retransmission timers, the phones' netlink batches, phases
    phone      one UE: its messages, steps, retransmissions and failure causes
    ue_ipsec   the UE's keys (AKA stand-in, 33.203 Annex I) and SAs as netlink requests
    scscf      the S-CSCF stub: 401 with CK/IK, 200 with Path, MESSAGE, MT requests
    sip        SIP over bytes, a regular expression per look-up
    net        the two namespaces, the phones' addresses, sockets, ESP counters
    kamailio   Kamailio started and stopped by process group
    scenario   the phases in order; report: what is printed
"""
