"""The seeded fault injector: parsing, reproducibility, and delayed sends through a real server."""
import numpy as np
import pytest

from common.config import ClientSettings, ServerSettings
from common.errors import ConfigError
from common.faults import FaultInjector, FaultSpec
from common.plan import PartitionPlan
from ps.server import ShardServer
from worker.client import PSClient


def test_parse_reads_rates_types_and_seed():
    spec = FaultSpec.parse("drop=0.1,dup=0.2,delay=0.3,delay_seconds=0.01,types=PUSH+PULL", seed=7)
    assert (spec.drop, spec.dup, spec.delay, spec.delay_seconds) == (0.1, 0.2, 0.3, 0.01)
    assert spec.types == ("PUSH", "PULL") and spec.seed == 7 and spec.active
    assert not FaultSpec.parse("none").active and not FaultSpec.parse("").active


@pytest.mark.parametrize("text,word", [("drop=2", "drop"), ("loss=0.1", "loss"), ("dup=x", "dup")])
def test_parse_rejects_bad_settings_naming_them(text, word):
    with pytest.raises(ConfigError, match=word):
        FaultSpec.parse(text)


def test_the_same_seed_injects_the_same_faults_and_other_types_are_untouched():
    spec = FaultSpec.parse("drop=0.2,dup=0.2,delay=0.2", seed=3)
    a, b = FaultInjector(spec, "w0"), FaultInjector(spec, "w0")
    plans = [a.plan("PUSH") for _ in range(200)]
    assert plans == [b.plan("PUSH") for _ in range(200)]
    assert {c for c, _ in plans} == {0, 1, 2}
    assert FaultInjector(spec, "w1").plan("PUSH") is not None
    assert all(a.plan("PULL") == (1, 0.0) for _ in range(50))


def test_delayed_and_duplicated_pushes_still_sum_exactly():
    server = ShardServer(ServerSettings(num_servers=1, num_workers=1, staleness="inf", lr=1.0)).run_in_background()
    plan = PartitionPlan.build([("w", (256,), "float32")], 1, frame_elems=128)
    c = PSClient([server.endpoint], 0, settings=ClientSettings(
        frame_elems=128, faults="dup=0.3,delay=0.5,delay_seconds=0.02", fault_seed=1)).start()
    try:
        c.hello(plan)
        c.init(np.zeros(256, np.float32))
        handles = [c.push(np.ones(256, np.float32), clk) for clk in range(30)]
        for h in handles:
            h.wait(30)
        m = c.pull(0, timeout=10, observer=True).wait(10)[0]
        w = np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames])
        counts = dict(c._faults.counts)
    finally:
        c.close()
        server.shutdown(5)
    assert counts["delayed"] > 0 and counts["duplicated"] > 0
    assert np.array_equal(w, np.full(256, -30.0, np.float32))
