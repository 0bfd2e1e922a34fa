"""Kamailio's start as an operator meets it: a bad define stops it, naming the parameter;
and `make demo` (tools/demo.py) keeps working."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pcscf_net import ROOT, Kamailio


def test_a_bad_parameter_stops_kamailio_naming_it(link, tmp_path):
    k = Kamailio(link, tmp_path, IPSEC_PREFERRED_ALG='"hmac-sha3"')
    with pytest.raises(AssertionError, match="kamailio exited"):
        k.start()
    deadline = time.monotonic() + 10
    while k.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert k.proc.returncode not in (None, 0)
    assert "refusing to start: ipsec_preferred_alg: unknown algorithm 'hmac-sha3'" in k.log()
    k.stop()


def test_make_demo_runs_through():
    done = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cleartext between protected ports: 0" in done.stdout
    assert "Done: everything went through ESP, and nothing is left." in done.stdout
