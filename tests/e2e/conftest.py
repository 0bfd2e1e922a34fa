"""End-to-end rig fixtures: one link, one S-CSCF stub and one Kamailio per test module."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "kernel"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from esp_net import link  # noqa: E402,F401  (the fixture)
from pcscf_net import Kamailio, Scscf  # noqa: E402


@pytest.fixture(scope="module")
def scscf(link):
    s = Scscf(link)
    yield s
    s.close()


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio"))
    k.start()
    yield k
    k.stop_and_check()  # the state invariant (tests/kernel/invariant.py), then Python errors


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed scenario shows what Kamailio logged (the last lines)."""
    outcome = yield
    report = outcome.get_result()
    k = item.funcargs.get("kamailio") if hasattr(item, "funcargs") else None
    if report.failed and k is not None:
        report.sections.append(("kamailio log (tail)", "\n".join(k.log().splitlines()[-40:])))
