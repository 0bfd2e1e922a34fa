"""Real-kernel tests: they need ESP (run them through tools/with-esp, which boots UML here)."""
from __future__ import annotations

import itertools
import subprocess

import pytest

from esp_net import link  # noqa: F401  (the fixture, shared with tests/e2e)

from ipsec.algorithms import esp_algs
from ipsec.xfrm import SA, SAId, Selector, Xfrm, XfrmError

_probe = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def kernel_has_esp() -> None:
    """Refuse to run, loudly, where the kernel cannot hold an ESP state: never skip."""
    ns = f"esp-probe-{next(_probe)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        x = Xfrm(netns=ns)
        algs = esp_algs("hmac-sha-1-96", "aes-cbc", bytes(16), bytes(16))
        x.add_sa(SA("192.0.2.1", "192.0.2.2", 0x1000, Selector("192.0.2.1", "192.0.2.2"), algs))
        x.delete_sa(SAId("192.0.2.2", 0x1000))
        x.close()
    except XfrmError as e:
        pytest.exit(f"this kernel cannot hold ESP states ({e}): run the kernel tests through "
                    "tools/with-esp (User-mode Linux)", returncode=1)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


@pytest.fixture(scope="module")
def x(link):
    """Our XFRM layer, talking to the P-CSCF namespace."""
    x = Xfrm(netns=link.pc)
    yield x
    x.close()
