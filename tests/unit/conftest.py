"""Unit-test set-up: `import KSR` must find the KSR double, before kemi.* is imported."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
