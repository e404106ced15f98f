"""Checkpoints as jobs really leave them, and the tools that operate on them.

Checkpoint folders are named in write order (ps/checkpoint.py): repeated
checkpoints at one step, an earlier job's checkpoints in the same folder,
folders of the earlier naming; a periodic checkpoint that fails; a restore
from a checkpoint whose meta.json lacks a key; ``ps-ctl checkpoint`` when one
server fails; ``ps-export`` beside stray folders and a server that prunes
while it reads; malformed addresses given to ``ps-ctl``/``ps-stat``.
"""
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from common.config import ClientSettings
from common.errors import ConfigError
from common.plan import PartitionPlan, frame_slices
from common.protocol import MsgType
from ps import checkpoint as ckpt
from tests.conftest import ROOT
from worker.client import PSClient
from zpscluster import ctl
from zpscluster.procs import bin_cmd

N = 300
FRAME = 128
PLAN = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=FRAME)


def shard(value: float) -> dict:
    return {"weights": np.full(N, value, np.float32)}


def job_meta() -> dict:
    """What ps-export needs of a server's checkpoint besides the weights."""
    return {"plan": PLAN.to_wire(), "plan_hash": PLAN.hash}


def names(root, rank=0) -> list[str]:
    return [os.path.basename(p) for p in ckpt.list_checkpoints(root, rank)]


def client(server) -> PSClient:
    """A worker 0 that said HELLO and INIT (zeros) to ``server``."""
    c = PSClient([server.endpoint], 0, settings=ClientSettings(frame_elems=FRAME)).start()
    c.hello(PLAN)
    c.init(np.zeros(N, np.float32))
    return c


# ---------------------------------------------------------------- names follow write order
def test_checkpoints_at_one_step_get_new_names_once_pruning_has_started(tmp_path):
    d = str(tmp_path)
    paths = [ckpt.write(d, 0, 7, shard(i), {}, keep=3) for i in range(5)]
    assert len(set(paths)) == 5
    assert ckpt.list_checkpoints(d, 0) == paths[-3:]
    assert ckpt.latest(d, 0) == paths[-1]
    assert ckpt.read(paths[-1])[1]["weights"][0] == 4


def test_a_server_answers_every_checkpoint_request_while_idle_and_checkpoints_at_shutdown(shard_servers, tmp_path):
    srv = shard_servers(num_workers=1, staleness=1, checkpoint_dir=str(tmp_path), checkpoint_keep=3)
    c = client(srv)
    try:
        c.push(np.ones(N, np.float32), 0).wait(10)
        paths = [c.request(0, MsgType.CHECKPOINT).result(30)["path"] for _ in range(5)]   # all at step 1
    finally:
        c.close()
    assert len(set(paths)) == 5
    assert srv.shutdown(10)                       # and once more, at step 1, at shutdown
    assert "CHECKPOINT_FAILED" not in srv.stats["errors"] and srv.stats["checkpoints"] == 6
    assert ckpt.latest(str(tmp_path), 0) == srv.last_checkpoint


def test_a_new_jobs_checkpoints_win_over_an_earlier_jobs_at_higher_steps(tmp_path):
    d = str(tmp_path)
    old = [ckpt.write(d, 0, step, shard(-1.0), job_meta(), keep=3) for step in (1000, 1001, 1002)]
    new = [ckpt.write(d, 0, 5, shard(5.0), job_meta(), keep=3)]
    assert ckpt.latest(d, 0) == new[0]            # restored and exported, though its step is lower
    assert ckpt.list_checkpoints(d, 0) == old[1:] + new
    sd, info = ctl.export_state_dict(d)
    assert info["steps"] == [5] and float(sd["w"][0]) == 5.0
    new += [ckpt.write(d, 0, step, shard(float(step)), job_meta(), keep=3) for step in (6, 7)]
    assert ckpt.list_checkpoints(d, 0) == new     # the earlier job's went first
    assert ckpt.latest(d, 0) == new[-1]


def test_checkpoints_named_in_the_earlier_format_are_read_and_count_as_older(tmp_path):
    d = str(tmp_path)
    base = ckpt.server_dir(d, 0)
    for step, n, value in [(300, 0, 3.0), (100, 1, 1.0), (300, 1, 4.0)]:   # ckpt-<step:012d>-<n:06d>
        os.rename(ckpt.write(d, 0, step, shard(value), job_meta(), keep=0),
                  os.path.join(base, f"ckpt-{step:012d}-{n:06d}"))
    assert names(d) == ["ckpt-000000000100-000001", "ckpt-000000000300-000000", "ckpt-000000000300-000001"]
    assert ckpt.read(ckpt.latest(d, 0))[1]["weights"][0] == 4.0
    newest = ckpt.write(d, 0, 50, shard(9.0), job_meta(), keep=3)
    assert ckpt.latest(d, 0) == newest
    assert names(d) == ["ckpt-000000000300-000000", "ckpt-000000000300-000001", os.path.basename(newest)]
    assert float(ctl.export_state_dict(d)[0]["w"][0]) == 9.0


def test_folders_that_are_no_checkpoint_are_neither_read_nor_pruned(tmp_path):
    d = str(tmp_path)
    first = ckpt.write(d, 0, 1, shard(1.0), {}, keep=1)
    stray = os.path.join(ckpt.server_dir(d, 0), "ckpt-keep-me")
    os.makedirs(stray)
    second = ckpt.write(d, 0, 2, shard(2.0), {}, keep=1)
    assert ckpt.list_checkpoints(d, 0) == [second] and not os.path.exists(first) and os.path.isdir(stray)


# ---------------------------------------------------------------- periodic checkpoints
def test_a_failing_periodic_checkpoint_is_counted_and_the_push_is_applied_once_and_acknowledged(
        shard_servers, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "write", full_disk)
    srv = shard_servers(num_workers=1, staleness=1, checkpoint_dir=str(tmp_path), checkpoint_every_steps=2)
    c = client(srv)
    try:
        for clk in range(4):
            (reply,) = c.push(np.ones(N, np.float32), clk).wait(10)
            assert reply["dup"] is False and reply["step"] == clk + 1
        stats = c.server_stats(0)
        assert stats["step"] == 4 and stats["pushes"] == 4
        assert stats["errors"] == {"CHECKPOINT_FAILED": 2}      # steps 2 and 4; no INTERNAL to the worker
        # push 1 (the one whose step failed to checkpoint), sent again: recorded, so not applied twice
        head = {"w": 0, "inc": c.incarnation, "seq": 1, "clk": 1, "ph": PLAN.hash, "n": N, "tick": True,
                "to": c.server_inc[0]}
        frames = [np.ones(b - a, np.float32).tobytes() for a, b in frame_slices(N, FRAME)]
        again = c.request(0, MsgType.PUSH, head, frames).result(10)
        assert again["dup"] is True and again["step"] == 4
    finally:
        c.close()


def test_a_periodic_checkpoint_holds_the_push_that_made_its_step_as_applied(shard_servers, tmp_path):
    srv = shard_servers(num_workers=1, staleness=1, checkpoint_dir=str(tmp_path), checkpoint_every_steps=2)
    c = client(srv)
    try:
        for clk in range(2):
            c.push(np.ones(N, np.float32), clk).wait(10)
        path = c.server_stats(0)["last_checkpoint"]    # answered after the checkpoint was written
    finally:
        c.close()
    meta, _ = ckpt.read(path)
    assert meta["step"] == 2 and meta["ledger"]["0"]["mark"] == 1   # pushes 0 and 1 both recorded


# ---------------------------------------------------------------- restore
@pytest.mark.parametrize("spoil", [
    pytest.param(lambda m: m.pop("plan"), id="no-plan"),
    pytest.param(lambda m: m.pop("clocks"), id="no-clocks"),
    pytest.param(lambda m: m.pop("ledger"), id="no-ledger"),
    pytest.param(lambda m: m.update(plan={"tensors": 5}), id="garbage-plan"),
    pytest.param(lambda m: m.update(clocks="0"), id="clocks-not-a-list"),
])
def test_restore_skips_a_checkpoint_whose_meta_lacks_what_it_needs_for_the_one_before(
        shard_servers, tmp_path, spoil):
    d = str(tmp_path)
    srv = shard_servers(num_workers=1, staleness=1, checkpoint_dir=d)
    c = client(srv)
    try:
        c.push(np.ones(N, np.float32), 0).wait(10)
        good = c.request(0, MsgType.CHECKPOINT).result(30)["path"]
        c.push(np.ones(N, np.float32), 1).wait(10)
    finally:
        c.close()
    assert srv.shutdown(10)                       # its shutdown checkpoint (step 2) is the newest
    newest = ckpt.latest(d, 0)
    assert newest != good
    with open(os.path.join(newest, "meta.json")) as fh:
        meta = json.load(fh)
    spoil(meta)
    with open(os.path.join(newest, "meta.json"), "w") as fh:
        json.dump(meta, fh)                       # valid JSON, checksums (of the .npy files) intact
    restored = shard_servers(num_workers=1, staleness=1, checkpoint_dir=d, restore=True)
    assert restored.restored_from == good and restored.stats["restored_step"] == 1


def test_restore_with_no_usable_checkpoint_is_a_clear_error(tmp_path):
    from common.config import ServerSettings
    from ps.server import ShardServer
    d = str(tmp_path)
    ckpt.write(d, 0, 3, shard(1.0), {"format": 1}, keep=3)    # readable, but no server's checkpoint
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ShardServer(ServerSettings(num_servers=1, num_workers=1, checkpoint_dir=d, restore=True))


def test_ps_server_restore_with_a_coordinator_needs_the_rank(tmp_path):
    out = subprocess.run(bin_cmd("ps-server", "--coordinator", "tcp://127.0.0.1:9", "--checkpoint-dir",
                                 str(tmp_path), "--restore"),
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "--rank" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- ps-ctl checkpoint
def test_ps_ctl_checkpoint_asks_every_server_and_fails_if_one_did(shard_servers, tmp_path):
    broken = shard_servers(num_workers=1, staleness=1)                 # no --checkpoint-dir
    fine = shard_servers(num_workers=1, staleness=1, checkpoint_dir=str(tmp_path))
    client(fine).close()
    out = subprocess.run(bin_cmd("ps-ctl", "checkpoint", "--servers", f"{broken.endpoint},{fine.endpoint}",
                                 "--timeout", "20"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{broken.endpoint}: FAILED: " in out.stdout and "no --checkpoint-dir" in out.stdout
    assert f"{fine.endpoint}: step 0 -> " in out.stdout and ckpt.latest(str(tmp_path), 0)
    assert broken.endpoint in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- ps-export
def test_ps_export_ignores_folders_that_are_no_server_rank(tmp_path, capsys):
    d = tmp_path / "ck"
    ckpt.write(str(d), 0, 4, shard(2.0), job_meta())
    for stray in ("server-old", "server-1.bak", "server-01"):
        (d / stray).mkdir()
    (d / "server-notes.txt").write_text("x")
    assert ctl.export_main([str(d), str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err
    assert "server-1.bak" in err and "server-old" in err and "Traceback" not in err
    import torch
    assert torch.load(tmp_path / "m.pt")["w"].eq(2.0).all()


def test_ps_export_reads_the_next_latest_when_the_chosen_checkpoint_is_pruned_before_it_is_read(
        tmp_path, monkeypatch):
    d = str(tmp_path)
    for step in (1, 2, 3):
        ckpt.write(d, 0, step, shard(float(step)), job_meta())
    newest = ckpt.latest(d, 0)
    real_read, opened = ckpt.read, []

    def read_then_pruned(path, verify=True):   # the server prunes it right after it was chosen
        opened.append(path)
        if path == newest and opened.count(path) > 1:
            shutil.rmtree(path)
        return real_read(path, verify)
    monkeypatch.setattr(ckpt, "read", read_then_pruned)
    sd, info = ctl.export_state_dict(d)
    assert info["steps"] == [3] and float(sd["w"][0]) == 3.0


def test_ps_export_looks_again_when_a_checkpoint_is_pruned_while_it_is_read(tmp_path, monkeypatch):
    d = str(tmp_path)
    for step in (1, 2, 3):
        ckpt.write(d, 0, step, shard(float(step)), job_meta())
    newest = ckpt.latest(d, 0)
    real_read, pruned = ckpt.read, []

    def pruned_under_it(path, verify=True):     # a server checkpointing every step: step 4 replaces 3
        if path == newest and not pruned:
            pruned.append(path)
            ckpt.write(d, 0, 4, shard(4.0), job_meta(), keep=3)
            shutil.rmtree(path)
        return real_read(path, verify)
    monkeypatch.setattr(ckpt, "read", pruned_under_it)
    sd, info = ctl.export_state_dict(d)
    assert pruned and info["steps"] == [4] and float(sd["w"][0]) == 4.0


# ---------------------------------------------------------------- addresses
@pytest.mark.parametrize("main, argv, flag", [
    (ctl.stat_main, ["--coordinator", "127.0.0.1:5555"], "--coordinator"),
    (ctl.ctl_main, ["status", "--coordinator", "nonsense"], "--coordinator"),
    (ctl.stat_main, ["--servers", "foo"], "--servers"),
    (ctl.ctl_main, ["checkpoint", "--servers", "tcp://127.0.0.1:9,tcp://127.0.0.1"], "--servers"),
    (ctl.ctl_main, ["shutdown", "--coordinator", "tcp://:5555"], "--coordinator"),
], ids=["stat-no-scheme", "ctl-status-nonsense", "stat-servers-foo", "ctl-checkpoint-no-port", "ctl-no-host"])
def test_a_malformed_address_is_a_usage_error_naming_the_flag_and_the_form(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert flag in err and "tcp://HOST:PORT" in err and "Traceback" not in err
