"""The daemons as a user starts them: READY lines, --help, signals, settings precedence."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from common.cli import add_settings, settings_from_args
from common.config import CoordinatorSettings, JobSettings, ServerSettings, WorkerSettings, resolve
from common.errors import ConfigError
from tests.conftest import ROOT
from zpscluster.procs import bin_cmd


@pytest.mark.parametrize("name,cls", [("ps-server", ServerSettings), ("ps-coordinator", CoordinatorSettings),
                                      ("ps-worker", WorkerSettings)])
def test_help_documents_every_setting(name, cls):
    out = subprocess.run(bin_cmd(name, "--help"), capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    def names(c):
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
                yield from names(type(f.default_factory()))
            else:
                yield f.name
    for n in names(cls):
        assert "--" + n.replace("_", "-") in out.stdout, f"{name} --help does not mention --{n}"
        assert "ZPS_" + n.upper() in " ".join(out.stdout.split()), f"{name} --help lacks ZPS_{n.upper()}"


@pytest.mark.slow
def test_daemons_print_ready_with_the_real_endpoint_and_stop_cleanly_on_sigterm(procs):
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "1"), "coordinator")
    info = coord.wait_ready(60)
    assert info["role"] == "coordinator" and info["rank"] == 0
    assert info["endpoint"].startswith("tcp://127.0.0.1:") and not info["endpoint"].endswith(":0")
    server = procs.start(bin_cmd("ps-server", "--coordinator", info["endpoint"], "--bind", "tcp://127.0.0.1:0"),
                         "server0")
    sinfo = server.wait_ready(60)
    assert sinfo["role"] == "server" and sinfo["rank"] == 0 and not sinfo["endpoint"].endswith(":0")
    for p in (server, coord):
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0, p.tail(10)
        print(f"{p.name} stopped {time.monotonic() - t0:.2f}s after SIGTERM")


@pytest.mark.slow
def test_a_standalone_server_stops_on_sigint(procs):
    p = procs.server(0, 1, 1, 0)
    p.signal(signal.SIGINT)
    assert p.wait(15) == 0


def test_bad_flags_fail_with_a_message_naming_the_value():
    out = subprocess.run(bin_cmd("ps-server", "--staleness", "-3"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "-3" in out.stderr


@pytest.mark.parametrize("cmd, code, says", [
    (("ps-server", "--checkpoint-dir", "{file}"), 2, "--checkpoint-dir: cannot create folder"),
    (("ps-server", "--checkpoint-dir", "/proc/zps-nowhere"), 2, "--checkpoint-dir: cannot create folder"),
    (("ps-server", "--bind", "tcp://127.0.0.1:99999"), 1, "port 99999 is above 65535"),
    (("ps-coordinator", "--bind", "tcp://127.0.0.1:65536"), 1, "port 65536 is above 65535"),
    (("ps-worker", "--coordinator", "tcp://127.0.0.1:9", "--out", "{file}/out"), 2, "--out: cannot create"),
    (("ps-worker", "--coordinator", "tcp://127.0.0.1:9", "--save", "{tmp}"), 2, "--save: {tmp} is a folder"),
    (("ps-launch", "--workload", "linreg", "--out", "{file}"), 2, "--out: cannot create folder"),
    (("ps-launch", "--workload", "linreg", "--out", "{tmp}/job", "--save", "/proc/zps-nowhere/m.pt"), 2,
     "--save: cannot create folder /proc/zps-nowhere"),
    (("ps-experiment", "--workload", "linreg", "--out", "{file}/grid"), 2, "--out: cannot create folder"),
    (("ps-soak", "--minutes", "0"), 2, "--minutes and --every must be above 0"),
    (("ps-soak", "--minutes", "1", "--json", "{file}/r.json"), 2, "--json: cannot create folder"),
])
def test_paths_and_ports_that_cannot_work_are_refused_at_start(tmp_path, cmd, code, says):
    """Found when the daemon starts, not at its first checkpoint or after the job ran."""
    (tmp_path / "a-file").write_text("x")
    sub = {"{file}": str(tmp_path / "a-file"), "{tmp}": str(tmp_path)}
    def fill(text):
        for k, v in sub.items():
            text = text.replace(k, v)
        return text
    out = subprocess.run(bin_cmd(*map(fill, cmd)), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == code, out.stderr
    assert fill(says) in out.stderr and "Traceback" not in out.stderr
    assert "READY" not in out.stdout and "[launch]" not in out.stdout


def test_precedence_is_flag_then_env_then_job_file_then_default(tmp_path):
    job = {"staleness": 3, "lr": 0.5, "server": {"lr": 0.25, "momentum": 0.9}}
    env = {"ZPS_LR": "0.125", "ZPS_STALENESS": "inf"}
    s = resolve(ServerSettings, {"staleness": "1"}, env, job, "server")
    assert s.staleness == 1            # flag beats env and file
    assert s.lr == 0.125               # env beats file
    assert s.momentum == 0.9           # file section
    s2 = resolve(ServerSettings, {}, {}, job, "server")
    assert s2.lr == 0.25 and s2.staleness == 3   # section beats top level
    assert resolve(ServerSettings, {}, {}, {}, "server").lr == ServerSettings().lr


def test_job_file_with_an_unknown_setting_is_an_error(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    add_settings(p, ServerSettings)
    ns = p.parse_args([])
    with pytest.raises(ConfigError, match="lrr"):
        settings_from_args(ServerSettings, ns, {"server": {"lrr": 1}}, "server", env={})


def test_job_settings_round_trip_and_validation():
    j = JobSettings(num_servers=2, num_workers=3, staleness="inf", workload="digits")
    assert JobSettings.from_wire(j.to_wire()) == j
    with pytest.raises(ConfigError, match="heartbeat"):
        JobSettings(worker_timeout=1.0, heartbeat_interval=1.0)
    with pytest.raises(ConfigError, match="-1"):
        JobSettings(steps=-1)


@pytest.mark.slow
def test_a_burst_of_stop_signals_stops_a_server_without_a_deadlock(procs):
    """A second SIGTERM arriving inside the first one's handler must not wait on the locks it holds."""
    for _ in range(5):   # the race is narrow: several rounds of many signals
        p = procs.server(0, 1, 1, 0)
        for _ in range(200):
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        assert p.wait(20) == 0, p.tail(10)


@pytest.mark.slow
def test_a_worker_whose_server_died_stops_within_seconds_of_sigterm(procs):
    """Its unacknowledged pushes are waited for briefly, not for the 10 s of a normal close."""
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "1", "--workload", "linreg", "--steps", "100000",
                                "--staleness", "inf"), "coordinator")
    cep = coord.wait_ready(60)["endpoint"]
    server = procs.start(bin_cmd("ps-server", "--coordinator", cep, "--bind", "tcp://127.0.0.1:0"), "server0")
    server.wait_ready(60)
    worker = procs.start(bin_cmd("ps-worker", "--coordinator", cep, "--progress", "off"), "worker0")
    worker.wait_ready(60)
    server.signal(signal.SIGKILL)
    assert server.wait(15) == -signal.SIGKILL
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGTERM)          # a second one must not break the clean-up
    assert worker.wait(15) == 130, worker.tail(10)
    took = time.monotonic() - t0
    assert took < 6, f"the worker took {took:.1f}s to stop"
    assert "Traceback" not in worker.tail(40), worker.tail(40)


@pytest.mark.slow
def test_a_worker_stopped_while_it_waits_for_the_others_to_finish_stops_within_seconds(procs, tmp_path):
    """The stop signal's interrupt ends the waits on the coordinator too (the "finished" barrier)."""
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "2", "--workload", "linreg", "--steps", "3",
                                "--staleness", "inf"), "coordinator")
    cep = coord.wait_ready(60)["endpoint"]
    procs.start(bin_cmd("ps-server", "--coordinator", cep, "--bind", "tcp://127.0.0.1:0"), "server0").wait_ready(60)
    worker = procs.start(bin_cmd("ps-worker", "--coordinator", cep, "--rank", "0", "--progress", "off",
                                 "--out", str(tmp_path)), "worker0")   # worker 1 never comes
    worker.wait_ready(60)
    deadline = time.monotonic() + 60
    result = tmp_path / "metrics-w0.jsonl"
    while not (result.exists() and len(result.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and worker.poll() is None, worker.tail(10)
        time.sleep(0.1)   # polling for the file, bounded by the deadline
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 130, worker.tail(10)
    took = time.monotonic() - t0
    assert took < 6, f"the worker took {took:.1f}s to stop"
    assert "interrupted" in worker.tail(10) and "Traceback" not in worker.tail(40), worker.tail(40)
    assert not list(tmp_path.glob("*-stop-stacks.txt")), "stopped by the grace's watchdog, not by itself"


def test_a_worker_refuses_a_device_this_torch_cannot_use(procs):
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "1", "--workload", "linreg"), "coordinator")
    cep = coord.wait_ready(60)["endpoint"]
    devices = ["tpu"] + ([] if __import__("torch").cuda.is_available() else ["cuda"])
    for dev in devices:
        out = subprocess.run(bin_cmd("ps-worker", "--coordinator", cep, "--device", dev),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and f"--device '{dev}'" in out.stderr, out.stderr[-500:]
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:5555", "nonsense", "tcp://127.0.0.1:99999"])
def test_a_malformed_address_is_refused_with_its_expected_form(address):
    from common.control import request_once
    from common.errors import ConfigError
    from common.protocol import MsgType

    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        request_once(address, MsgType.STATUS, timeout=1)
    out = subprocess.run(bin_cmd("ps-worker", "--coordinator", address), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--coordinator" in out.stderr and "tcp://HOST:PORT" in out.stderr, out.stderr


_STOPPING = """
import sys, threading
sys.path.insert(0, {root!r})
from common.cli import on_stop_signal

def clean_up_that_never_ends():
    threading.Event().wait(120)

stop = on_stop_signal(lambda signum: None, grace=1.0, stacks_file=lambda: sys.argv[1])
print("READY {{}}", flush=True)
stop.wait(120)
if sys.argv[2] == "hangs":
    clean_up_that_never_ends()
sys.exit(7)
"""


@pytest.mark.parametrize("clean_up", ["hangs", "ends"])
def test_a_stop_whose_clean_up_hangs_ends_after_the_grace_with_every_threads_stack(tmp_path, clean_up):
    """The grace bounds a stop; a process that overruns it says where it was stuck, in stderr and a file."""
    stacks = tmp_path / "stacks.txt"
    proc = subprocess.Popen([sys.executable, "-c",
                             _STOPPING.format(root=ROOT), str(stacks), clean_up],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("READY"), proc.stderr.read()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if clean_up == "ends":
        assert proc.returncode == 7 and not stacks.exists(), err
        return
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took >= 1.0, f"exited {took:.2f}s after SIGTERM, before its 1 s grace"
    assert "still running 1s after SIGTERM" in err and "clean_up_that_never_ends" in err, err
    assert "clean_up_that_never_ends" in stacks.read_text()
