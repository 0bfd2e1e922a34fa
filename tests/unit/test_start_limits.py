"""What Kamailio may start with when there are many port pairs (issue 9 item 4).

Port pairs are not phones: every pair is 2 protected UDP sockets per address family, each
with worker processes of its own, so too many pairs are refused with the reason and the
advice; the open files the sockets and workers need are checked (and the soft limit raised)
before the fork, where Kamailio otherwise dies part-way with `Cannot fork`; and the main
process, which every worker is forked from, does not carry all of pyroute2.
"""
from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

import KSR
from ipsec.params import MAX_CONNECTIONS, ParamError, Params
from kemi.workers import StartError, Workers, ensure_open_files
from scenario import FakeKernel, defines

ROOT = Path(__file__).resolve().parents[2]


# ---- the limit on port pairs ----------------------------------------------------------

@pytest.mark.parametrize("v6, processes", [("", 416), ("fd00::1", 832)])
def test_too_many_port_pairs_are_refused_with_the_reason_and_the_advice(v6, processes):
    with pytest.raises(ParamError) as e:
        Params(ipsec_listen_addr="10.0.0.1", ipsec_listen_addr6=v6, ipsec_max_connections=208)
    text = str(e.value)
    assert text.startswith("ipsec_max_connections: 208 port pairs is more than 100")
    assert "not the number of phones" in text and "a few suffice" in text
    assert f"would start {processes} processes or more" in text
    assert "IPSEC_CHILDREN" in text


def test_the_limit_itself_is_accepted_and_one_more_is_not():
    assert Params(ipsec_listen_addr="10.0.0.1", ipsec_max_connections=MAX_CONNECTIONS)
    with pytest.raises(ParamError, match="is more than 100"):
        Params(ipsec_listen_addr="10.0.0.1", ipsec_max_connections=MAX_CONNECTIONS + 1)
    with pytest.raises(ParamError, match="out of range 1..65535"):
        Params(ipsec_listen_addr="10.0.0.1", ipsec_max_connections=0)


def test_mod_init_refuses_too_many_port_pairs(tmp_path, mocker):
    mocker.patch("ipsec.module.Xfrm", return_value=FakeKernel())
    pcscf = _load_script(tmp_path, IPSEC_MAX_CONNECTIONS="208")
    assert pcscf.mod_init() is None
    (line,) = KSR._rec.logs["err"]
    assert line.startswith("ims-ipsec: refusing to start: ipsec_max_connections: 208 port pairs")


# ---- sockets, processes and open files --------------------------------------------------

def _workers(pairs: int, children: int, ipsec_children: int, *, v6: bool = False,
             client: int = 5100, server: int = 5400) -> Workers:
    params = Params(ipsec_listen_addr="10.77.0.1", ipsec_listen_addr6="fd77::1" if v6 else "",
                    ipsec_client_port=client, ipsec_server_port=server,
                    ipsec_max_connections=pairs)
    values = {"CHILDREN": str(children), "IPSEC_CHILDREN": str(ipsec_children),
              "PCSCF_IP6": "[fd77::1]" if v6 else ""}
    return Workers.from_defines(params, lambda name: values.get(name, ""))


def test_sockets_count_ports_once_when_client_and_server_ranges_overlap():
    w = _workers(2, 2, 1, v6=True, client=5062, server=5063)  # 5062..5063 and 5063..5064
    assert (w.protected_sockets, w.plain_sockets) == (3 * 2, 2)
    assert w.processes == 6 * 1 + 2 * 2 + 16


def test_the_core_socket_gets_its_workers_counted():
    params = Params(ipsec_listen_addr="10.0.0.1", ipsec_max_connections=2)
    values = {"CHILDREN": "3", "IPSEC_CHILDREN": "1", "CORE_IP": "10.1.0.1"}
    w = Workers.from_defines(params, lambda name: values.get(name, ""))
    assert w.plain_sockets == 2 and w.processes == w.protected_sockets + 2 * 3 + 16


@pytest.mark.parametrize("pairs, children, ipsec_children, processes, open_files", [
    (10, 2, 2, 50, 98),  # measured in User-mode Linux before IPSEC_CHILDREN (every socket: 2)
    (100, 2, 2, 410, 818),
    (10, 2, 1, 30, 78),  # and with IPSEC_CHILDREN=1
    (100, 2, 1, 210, 618),
])
def test_estimates_cover_what_kamailio_was_measured_to_use(pairs, children, ipsec_children,
                                                           processes, open_files):
    w = _workers(pairs, children, ipsec_children)
    assert processes <= w.processes <= processes + 10
    assert open_files <= w.open_files <= open_files + 100


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard, self.set_to = soft, hard, None

    def get(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which, value):
        self.set_to = value


def test_open_files_limit_is_raised_before_the_fork_when_the_hard_limit_allows():
    w = _workers(100, 2, 1)
    limits, logs = Limits(256, 4096), []
    ensure_open_files(w, logs.append, limits.get, limits.set)
    assert limits.set_to == (w.open_files + 1024, 4096)
    assert logs and f"open files limit raised from 256 to {w.open_files + 1024}" in logs[0]


def test_open_files_limit_is_raised_at_most_to_the_hard_limit():
    w = _workers(100, 2, 1)
    limits = Limits(256, w.open_files + 10)
    ensure_open_files(w, lambda _: None, limits.get, limits.set)
    assert limits.set_to == (w.open_files + 10, w.open_files + 10)


def test_enough_open_files_changes_nothing():
    limits = Limits(20000, 20000)
    ensure_open_files(_workers(100, 2, 1), lambda _: None, limits.get, limits.set)
    assert limits.set_to is None


def test_a_hard_limit_too_low_refuses_to_start_with_the_numbers_and_the_advice():
    w = _workers(100, 4, 4)
    limits = Limits(1024, 1024)
    with pytest.raises(StartError) as e:
        ensure_open_files(w, lambda _: None, limits.get, limits.set)
    text = str(e.value)
    assert f"{w.processes} processes need about {w.open_files} open files" in text
    assert "the limit is 1024 (hard 1024)" in text and "fail to fork" in text
    assert "LimitNOFILE=" in text and "IPSEC_MAX_CONNECTIONS" in text and "a few suffice" in text
    assert limits.set_to is None


def test_mod_init_refuses_when_the_open_files_cannot_be_had(tmp_path, mocker):
    mocker.patch("ipsec.module.Xfrm", return_value=FakeKernel())
    mocker.patch("kemi.workers.resource.getrlimit", return_value=(64, 64))
    pcscf = _load_script(tmp_path, IPSEC_MAX_CONNECTIONS="50", CHILDREN="4", IPSEC_CHILDREN="1")
    assert pcscf.mod_init() is None
    (line,) = KSR._rec.logs["err"]
    assert line.startswith("ims-ipsec: refusing to start: open files: 100 protected and 1 port "
                           "5060 UDP sockets")


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_worker_count_is_refused(value):
    params = Params(ipsec_listen_addr="10.0.0.1")
    with pytest.raises(StartError, match="IPSEC_CHILDREN: .* is not a number of worker processes"):
        Workers.from_defines(params, {"CHILDREN": "4", "IPSEC_CHILDREN": value}.get)


def test_the_first_sweep_announces_the_end_of_the_start_up(tmp_path, mocker):
    """rtimer's process is forked after every UDP worker: its first sweep says so, once."""
    mocker.patch("ipsec.module.Xfrm", return_value=FakeKernel())
    app = _load_script(tmp_path).mod_init()
    app.ksr_ipsec_sweep(None, "ipsec_sweep")
    app.ksr_ipsec_sweep(None, "ipsec_sweep")
    said = [l for l in KSR._rec.logs["info"] if "started" in l]
    assert len(said) == 1 and said[0].startswith("ims-ipsec: started: every UDP worker is up, ")


# ---- what the main process imports ------------------------------------------------------

def test_the_main_process_loads_pyroute2_netlink_without_the_rest_of_pyroute2():
    """kemi/pcscf.py as app_python3 loads it, in a fresh interpreter: pyroute2's package
    __init__ (all of pyroute2, asyncio, ...) does not run, yet still does on first use."""
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT / 'kemi' / 'double')!r}, {str(ROOT)!r}]\n"
        "import kemi.pcscf\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('pyroute2'))\n"
        "assert loaded == ['pyroute2', 'pyroute2.common', 'pyroute2.netlink',"
        " 'pyroute2.netlink.exceptions'], loaded\n"
        "assert 'asyncio' not in sys.modules\n"
        "from pyroute2 import IPRoute\n"
        "import pyroute2\n"
        "assert IPRoute.__name__ == 'IPRoute' and pyroute2.__version__ and 'asyncio' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr


def _load_script(tmp_path, **overrides):
    KSR._reset()
    KSR._defines(defines(str(tmp_path / "s.sqlite"), **overrides))
    sys.modules.pop("kemi.pcscf", None)
    import kemi.pcscf as pcscf_script
    return pcscf_script
