"""CI's share of `make fuzz` (tests/fuzz_sip.py): 10,000 hostile messages through the routing
over the KSR double, a real store with a registered phone and the fake kernel. No exception
escapes, no request changes the store or the kernel, no reply leaves with ck/ik, the store and
the kernel agree; and the messages reach every part of the routing (not all refused early)."""
from __future__ import annotations

from tests.fuzz_sip import run_batch


def test_ten_thousand_hostile_messages_through_the_routing():
    done, counts, findings = run_batch(seed=20261204, count=10_000, seconds=600)
    assert done == 10_000
    assert findings == {}, findings
    for outcome in ("request relayed", "request answered 403", "request answered 480",
                    "request answered 481", "reply dropped", "reply forwarded", "core-refused"):
        assert counts.get(outcome, 0) > 50, counts
