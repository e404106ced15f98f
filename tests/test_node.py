"""ps-node: rank -> role under every launcher convention (pure functions of an env dict),
the addresses each role picks, and a real torchrun job on this host (slow)."""
import json
import os
import subprocess
import sys

import pytest

from common.errors import ConfigError, DeadlineExceeded
from common.netaddr import AddressError
from tests.conftest import ROOT
from zpscluster import node
from zpscluster.launch import launch_parser
from zpscluster.node import Lookups, Placement, Role, detect_placement, expand_nodelist, role_of


# ------------------------------------------------------------------ Slurm node lists
@pytest.mark.parametrize("text,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node01", ["node01"]),
    ("a[1-2],b5", ["a1", "a2", "b5"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
    ("x[1],y[002-003],z", ["x1", "y002", "y003", "z"]),
    ("", []),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node1]", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_names_a_bad_list(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


# ------------------------------------------------------------------ conventions
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "6", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "6", "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}


def test_torchrun_on_one_host():
    p = detect_placement(TORCHRUN)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.all_local) == ("torchrun", 3, 6, 3, True)
    assert node.coordinator_host(p, TORCHRUN) == "127.0.0.1" and node.coordinator_port(p, TORCHRUN) == 29501


def test_torchrun_across_nodes():
    env = {**TORCHRUN, "RANK": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "node01"}
    p = detect_placement(env)
    assert (p.rank, p.local_rank, p.all_local, p.coordinator_host) == (4, 1, False, "node01")


def test_kubeflow_pytorchjob():
    env = {"RANK": "2", "WORLD_SIZE": "6", "MASTER_ADDR": "zps-master-0", "MASTER_PORT": "23456",
           "PET_NNODES": "6", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    p = detect_placement(env)
    assert (p.launcher, p.rank, p.world_size, p.all_local) == ("kubeflow", 2, 6, False)
    assert node.coordinator_host(p, env) == "zps-master-0" and node.coordinator_port(p, env) == 23457


SLURM = {"SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-03,07]",
         "SLURM_NNODES": "4", "SLURM_JOB_ID": "123456"}


def test_slurm_takes_the_first_node_and_a_port_from_the_job_id():
    p = detect_placement(SLURM)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.all_local) == ("slurm", 4, 6, 1, False)
    assert node.coordinator_host(p, SLURM) == "node01"
    assert node.coordinator_port(p, SLURM) == 20000 + 123456 % 20000
    assert node.coordinator_port(p, {**SLURM, "ZPS_COORDINATOR_PORT": "6000"}) == 6000
    assert node.coordinator_port(p, SLURM, port=7000) == 7000


def test_slurm_older_variable_names_and_the_step_node_list():
    env = {"SLURM_PROCID": "0", "SLURM_NPROCS": "3", "SLURM_NODELIST": "c[5-6]", "SLURM_JOB_NUM_NODES": "1"}
    p = detect_placement(env)
    assert (p.world_size, p.coordinator_host, p.all_local) == (3, "c5", True)
    p = detect_placement({**SLURM, "SLURM_STEP_NODELIST": "node[02-03]"})
    assert p.coordinator_host == "node02"


def test_slurm_without_ntasks_says_what_to_do():
    with pytest.raises(ConfigError, match="SLURM_NTASKS"):
        detect_placement({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"})


def test_open_mpi_needs_a_coordinator_host_unless_every_rank_is_local():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    p = detect_placement(env)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.all_local) == ("openmpi", 5, 6, 1, False)
    with pytest.raises(ConfigError, match="--coordinator-host HOST.*ZPS_COORDINATOR_HOST"):
        node.coordinator_host(p, env)
    assert node.coordinator_host(p, {**env, "ZPS_COORDINATOR_HOST": "node07"}) == "node07"
    assert node.coordinator_host(p, env, flag="node09") == "node09"
    local = detect_placement({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "6"})
    assert node.coordinator_host(local, env) == "127.0.0.1"
    assert node.coordinator_port(p, env) == node.DEFAULT_PORT


def test_mpich_and_intel_mpi_through_pmi():
    p = detect_placement({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"})
    assert (p.launcher, p.rank, p.world_size, p.all_local) == ("pmi", 2, 4, False)


def test_a_launcher_inside_a_slurm_allocation_wins_over_slurm():
    assert detect_placement({**SLURM, **TORCHRUN}).launcher == "torchrun"
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "6"}
    assert detect_placement({**SLURM, **ompi}).launcher == "openmpi"
    assert detect_placement({**SLURM, **ompi}, launcher="slurm").rank == 4


def test_flags_override_or_replace_the_environment():
    assert detect_placement({}, rank=2, world_size=4) == Placement("flags", 2, 4, source="--rank/--world-size")
    assert detect_placement(TORCHRUN, rank=0).rank == 0
    with pytest.raises(ConfigError, match="both --rank and --world-size"):
        detect_placement({}, rank=1)


def test_no_convention_and_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="torchrun.*srun.*mpirun.*--rank R --world-size N"):
        detect_placement({"HOME": "/root"})
    with pytest.raises(ConfigError, match="outside \\[0, 6\\)"):
        detect_placement({**TORCHRUN, "RANK": "6"})
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        detect_placement({**TORCHRUN, "RANK": "x"})
    with pytest.raises(ConfigError, match="launcher must be one of"):
        detect_placement(TORCHRUN, launcher="pbs")


# ------------------------------------------------------------------ roles
def test_rank_zero_coordinator_then_servers_then_workers():
    roles = [role_of(r, 6, 2, 3) for r in range(6)]
    assert roles == [Role("coordinator", 0), Role("server", 0), Role("server", 1),
                     Role("worker", 0), Role("worker", 1), Role("worker", 2)]


def test_the_coordinator_rank_can_move():
    roles = [role_of(r, 6, 2, 3, coordinator_rank=5) for r in range(6)]
    assert roles == [Role("server", 0), Role("server", 1), Role("worker", 0), Role("worker", 1),
                     Role("worker", 2), Role("coordinator", 0)]


def test_a_roles_list_spells_the_mapping_out():
    spec = node.parse_roles("w, s*2, c, worker*2")
    assert spec == ["worker", "server", "server", "coordinator", "worker", "worker"]
    assert [role_of(r, 6, 0, 0, roles=spec) for r in range(6)] == [
        Role("worker", 0), Role("server", 0), Role("server", 1), Role("coordinator", 0), Role("worker", 1),
        Role("worker", 2)]
    with pytest.raises(ConfigError, match="exactly one coordinator"):
        node.parse_roles("s,w")
    with pytest.raises(ConfigError, match="unknown role 'x'"):
        node.parse_roles("c,x,w")
    with pytest.raises(ConfigError, match="lists 6 ranks but the world size is 5"):
        role_of(0, 5, 1, 1, roles=spec)


def test_a_world_size_that_does_not_add_up_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        role_of(0, 5, 2, 3, source="RANK/WORLD_SIZE from torchrun")
    text = str(err.value)
    assert "world size 5 (RANK/WORLD_SIZE from torchrun)" in text
    assert "1 coordinator + 2 servers + 3 workers = 6" in text and "--nproc-per-node 6" in text


# ------------------------------------------------------------------ the plan: addresses and arguments
FAKE = Lookups(interface={"eth0": "10.0.0.3", "ib0": "192.168.0.3"}.__getitem__,
               route=lambda host: "10.0.0.3", resolve=lambda host: {"node01": "10.0.0.1"}.get(host, host),
               is_local=lambda addr: addr == "10.0.0.1")


def plan(argv, env, lookups=FAKE):
    return node.plan_node(node.node_parser().parse_args(argv), env, lookups)


def test_the_plan_on_one_host_binds_loopback_everywhere():
    argv = ["--servers", "2", "--workers", "3", "--steps", "50", "--out", "o", "--save", "m.pt"]
    c = plan(argv, {**TORCHRUN, "RANK": "0"})
    assert c.role == Role("coordinator", 0) and c.bind == "tcp://127.0.0.1:29501"
    assert c.argv[:2] == ("--bind", "tcp://127.0.0.1:29501")
    joined = " ".join(c.argv)
    assert "--num-servers 2 --num-workers 3" in joined and "--steps 50" in joined and "--workload digits" in joined
    s = plan(argv, {**TORCHRUN, "RANK": "2"})
    assert s.role == Role("server", 1) and (s.bind, s.advertise) == ("tcp://127.0.0.1:0", "127.0.0.1")
    assert s.argv[:4] == ("--coordinator", "tcp://127.0.0.1:29501", "--rank", "1")
    w0, w2 = plan(argv, {**TORCHRUN, "RANK": "3"}), plan(argv, {**TORCHRUN, "RANK": "5"})
    assert "--save" in w0.argv and "lines" in w0.argv and "--save" not in w2.argv and "off" in w2.argv
    assert w2.argv[w2.argv.index("--out") + 1] == "o" and w2.bind == ""


def multi(rank, **extra):
    return {**TORCHRUN, "RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node01", **extra}


def test_the_plan_across_hosts_binds_the_coordinator_host_and_routable_server_addresses():
    argv = ["--servers", "2", "--workers", "3"]
    c = plan(argv, multi(0))
    assert c.remote and c.coordinator == "tcp://node01:29501" and c.bind == "tcp://10.0.0.1:29501"
    s = plan(argv, multi(1))
    assert (s.bind, s.advertise) == ("tcp://10.0.0.3:0", "10.0.0.3")
    s = plan(argv + ["--interface", "ib0", "--server-port", "7000"], multi(2, LOCAL_RANK="1"))
    assert (s.bind, s.advertise) == ("tcp://192.168.0.3:7001", "192.168.0.3")
    c = plan(argv + ["--interface", "ib0"], multi(0))
    assert c.bind == "tcp://192.168.0.3:29501"


def test_a_coordinator_bind_keeps_the_port_every_rank_derives():
    env = {**multi(0), "WORLD_SIZE": "3"}
    assert plan(["--servers", "1", "--workers", "1", "--bind", "tcp://0.0.0.0:0"], env).bind == "tcp://0.0.0.0:29501"
    with pytest.raises(ConfigError, match="must listen on port 29501"):
        plan(["--servers", "1", "--workers", "1", "--bind", "tcp://0.0.0.0:7000"], env)


def test_a_coordinator_name_that_is_not_on_this_host_binds_every_address():
    # e.g. a Kubernetes Service address, or a NAT name: listen everywhere, never on loopback alone
    c = plan(["--servers", "1", "--workers", "1"], {**multi(0), "WORLD_SIZE": "3", "MASTER_ADDR": "svc.ns"})
    assert c.bind == "tcp://0.0.0.0:29501"
    debian = Lookups(resolve=lambda h: "127.0.1.1", route=lambda h: "127.0.1.1", is_local=lambda a: True,
                     interface=FAKE.interface)
    c = plan(["--servers", "1", "--workers", "1"], {**multi(0), "WORLD_SIZE": "3"}, debian)
    assert c.bind == "tcp://0.0.0.0:29501"


def test_a_server_refuses_to_advertise_loopback_to_other_hosts():
    with pytest.raises(AddressError) as err:
        plan(["--servers", "2", "--workers", "3", "--bind", "tcp://127.0.0.1:0"], multi(1))
    assert "--interface" in str(err.value) and "tcp://127.0.0.1" in str(err.value)
    debian = Lookups(resolve=lambda h: "127.0.1.1", route=lambda h: "127.0.1.1", is_local=lambda a: True,
                     interface=FAKE.interface)
    with pytest.raises(AddressError, match="--interface NAME"):
        plan(["--servers", "2", "--workers", "3"], multi(1), debian)


def test_a_server_beside_a_coordinator_whose_name_is_loopback_here_advertises_the_default_route():
    # Debian's "127.0.1.1 hostA" on hostA: the route to hostA is loopback; the default route's address is not
    lookups = Lookups(resolve=lambda h: "127.0.1.1", is_local=lambda a: True, interface=FAKE.interface,
                      route=lambda h: "10.0.0.7" if h == node.DEFAULT_ROUTE_PROBE else "127.0.1.1")
    s = plan(["--servers", "2", "--workers", "3"], multi(1), lookups)
    assert (s.bind, s.advertise) == ("tcp://10.0.0.7:0", "10.0.0.7")


def test_an_explicit_coordinator_url_and_a_roles_list():
    p = plan(["--coordinator", "tcp://10.0.0.1:6000", "--roles", "c,s,w*2"],
             {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"})
    assert p.role == Role("server", 0) and p.coordinator == "tcp://10.0.0.1:6000"
    assert (p.servers, p.workers) == (1, 2)


def test_every_job_flag_of_ps_launch_reaches_a_role():
    launcher_only = {"--restarts", "--timeout", "--quiet", "-h", "--help"}
    for a in launch_parser()._actions:
        flag = next((s for s in a.option_strings if s.startswith("--")), None)
        if flag is None or flag in launcher_only:
            continue
        value = [] if a.nargs == 0 else ["7" if a.type in (int, float) else "x7"]
        if flag in ("--servers", "--workers"):
            value = ["2" if flag == "--servers" else "3"]
        argvs = [" ".join(plan(["--servers", "2", "--workers", "3", flag, *value], {**TORCHRUN, "RANK": str(r)}).argv)
                 for r in (0, 1, 3)]
        shown = {"--servers": "--num-servers 2", "--workers": "--num-workers 3"}.get(flag, " ".join([flag, *value]))
        assert any(shown in a_ for a_ in argvs), f"{flag} reaches no role: {argvs}"


def test_wait_for_coordinator_gives_up_at_its_deadline_naming_the_doctor():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeadlineExceeded, match="refused.*ps-doctor --coordinator"):
        node.wait_for_coordinator(f"tcp://127.0.0.1:{port}", 1.0)


def test_ps_node_exits_2_with_the_world_size_error():
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "ps-node"), "--servers", "2", "--workers", "4"],
                         capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert out.returncode == 2 and "1 coordinator + 2 servers + 4 workers = 7" in out.stderr


# ------------------------------------------------------------------ a real launcher
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_runs_a_digits_job_to_the_target_after_the_doctor(tmp_path):
    import socket
    with socket.socket() as s:  # torchrun's store takes MASTER_PORT, the coordinator MASTER_PORT + 1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "out"
    cmd = [torchrun, "--nproc-per-node", "6", "--master-addr", "127.0.0.1", "--master-port", str(port),
           os.path.join(ROOT, "bin", "ps-node"), "--servers", "2", "--workers", "3", "--workload", "digits",
           "--steps", "300", "--staleness", "2", "--out", str(out), "--save", str(tmp_path / "model.pt"), "--doctor"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=220)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    lines = text.splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    roles = sorted(line.split("-> ")[1].split(";")[0] for line in lines if line.startswith("ps-node: rank"))
    assert roles == ["coordinator 0", "server 0", "server 1", "worker 0", "worker 1", "worker 2"]
    assert sum("verdict: PASS" in line for line in lines) == 6  # --doctor: every rank checked first
    s = json.loads((out / "summary.json").read_text())
    print(f"torchrun x6, digits s=2: accuracy {s['eval_metric']['value']:.4f} in {s['wall_seconds']:.1f}s")
    assert s["eval_metric"]["name"] == "accuracy" and s["eval_metric"]["value"] >= 0.90
    assert s["servers"] == 2 and s["workers"] == 3 and s["iterations"] == 900
    assert (tmp_path / "model.pt").exists()
