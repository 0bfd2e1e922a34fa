"""Unit-test set-up: `import KSR` must find the KSR double, before kemi.* is imported;
hypothesis without per-example deadlines."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# A loaded CI machine must not turn slow examples into failures: no per-example deadline.
settings.register_profile("project", deadline=None)
settings.load_profile("project")

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT / "kemi" / "double", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def pcscf(tmp_path):
    """A P-CSCF (module + routing script) over the KSR double, a fake kernel, a real store."""
    from scenario import Pcscf

    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"))
    yield p
    p.module.store.close()


@pytest.fixture(autouse=True)
def _unfrozen():
    """mod_init freezes the objects it built (kemi.workers.freeze_for_fork, for Kamailio's
    forked workers); in this process the next test must find the collector whole again."""
    yield
    gc.unfreeze()
