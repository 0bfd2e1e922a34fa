"""The operator's command line (`python -m ipsec`, `ims-ipsec`): a live P-CSCF's store and kernel.

    config     where the store is and what the parameters are: kamailio.cfg's defines
    views      rows of `list`, `show` and `stats`: plain functions over store records and
               kernel dumps, no I/O
    doctor     the diagnoses of `doctor` (drift, store, listen sockets, ESP), no I/O either
    render     those rows as aligned text (JSON is the rows themselves)
    commands   each verb: read the store and the kernel (through ipsec.store and ipsec.xfrm),
               call the above, write what it found
    main       options, errors and exit codes
"""
