"""Linux XFRM (IPsec SAs and policies) over netlink: the module's only door to the kernel.

    x = Xfrm()                      # socket opened on first use, per process
    x.add_sa(SA(...)); x.add_policy(Policy(...))
    x.batch([new_sa(a), new_policy(p), ...])   # many requests, every ACK read
    x.states(user=MARKER); x.flush(MARKER)
"""
from .client import Flushed, Xfrm
from .codec import Request, del_policy, del_sa, new_policy, new_sa, update_policy, update_sa
from .errors import XfrmError, XfrmExists, XfrmNotFound
from .model import (
    SA,
    Dir,
    Lifetime,
    Policy,
    PolicyId,
    PolicyInfo,
    SAId,
    SAInfo,
    Selector,
    Template,
)

__all__ = [
    "SA",
    "Dir",
    "Flushed",
    "Lifetime",
    "Policy",
    "PolicyId",
    "PolicyInfo",
    "Request",
    "SAId",
    "SAInfo",
    "Selector",
    "Template",
    "Xfrm",
    "XfrmError",
    "XfrmExists",
    "XfrmNotFound",
    "del_policy",
    "del_sa",
    "new_policy",
    "new_sa",
    "update_policy",
    "update_sa",
]
