"""Built-in workloads: determinism, data partitioning, losses, metrics and that defaults train.

Pure unit tests: no sockets, no processes.  Training runs are local and
single-process (one simulates the staleness an asynchronous parameter server
introduces by computing gradients on weights a few updates old).
"""
from __future__ import annotations

import collections
import math
import time

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from worker.workloads import (WORKLOADS, CharLM, LinearRegression, Workload, WorkloadDefaults,
                              get_workload, partition)

NAMES = sorted(WORKLOADS)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose much when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workloads() -> dict[str, Workload]:
    """One default workload per name, shared by the read-only tests of this module."""
    return {name: get_workload(name, seed=0) for name in NAMES}


def make_optimizer(wl: Workload, model: torch.nn.Module) -> torch.optim.Optimizer:
    d = wl.defaults
    if d.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=d.lr, momentum=d.momentum)
    assert d.optimizer == "adam", d.optimizer
    return torch.optim.Adam(model.parameters(), lr=d.lr)


def train_locally(wl: Workload, model: torch.nn.Module, steps: int, world: int = 1,
                  delay: int = 0) -> None:
    """``steps`` updates, taking batches from ranks round-robin.

    With ``delay`` > 0 each gradient is computed on the weights as they were
    ``delay`` updates earlier, as an asynchronous worker's would be.
    """
    opt = make_optimizer(wl, model)
    streams = [wl.batches(rank, world) for rank in range(world)]
    stale = wl.build_model() if delay else model
    history: collections.deque = collections.deque(maxlen=delay + 1)
    for step in range(steps):
        if delay:
            history.append(parameters_to_vector(model.parameters()).detach().clone())
            with torch.no_grad():
                vector_to_parameters(history[0], stale.parameters())
        stale.zero_grad()
        wl.loss(stale, next(streams[step % world])).backward()
        if delay:
            for p, q in zip(model.parameters(), stale.parameters()):
                p.grad = q.grad.clone()
        opt.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- partition
@pytest.mark.parametrize("n,world", [(0, 1), (1, 1), (10, 3), (12, 4), (5, 8), (4096, 7)])
def test_partition_splits_into_contiguous_near_equal_parts_covering_everything(n, world):
    parts = [partition(n, rank, world) for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n,rank,world,needle", [
    (10, -1, 2, "rank"), (10, 2, 2, "rank"), (10, 0, 0, "world"), (-1, 0, 1, "n"),
    (10, 0.5, 2, "rank"), (10, True, 2, "rank"), ("10", 0, 1, "n"),
])
def test_partition_rejects_bad_arguments_naming_them(n, rank, world, needle):
    with pytest.raises(ValueError, match=needle):
        partition(n, rank, world)


# --------------------------------------------------------------------------- registry and options
def test_registry_holds_the_four_builtin_workloads_with_consistent_metadata():
    assert set(WORKLOADS) == {"linreg", "digits", "mf", "charlm"}
    expected = {"linreg": ("weight_distance", False), "digits": ("accuracy", True),
                "mf": ("rmse", False), "charlm": ("bits_per_char", False)}
    for name, cls in WORKLOADS.items():
        assert cls.name == name
        assert (cls.metric_name, cls.higher_is_better) == expected[name]
        assert isinstance(cls.defaults, WorkloadDefaults)
        assert cls.defaults.optimizer in ("sgd", "adam", "adamw", "adagrad")
        assert cls.defaults.quick_steps <= cls.defaults.steps


def test_unknown_workload_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="nosuch") as info:
        get_workload("nosuch")
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_raise_naming_them(name):
    with pytest.raises(ValueError, match="bogus_size.*other_flag"):
        get_workload(name, bogus_size=3, other_flag=True)


@pytest.mark.parametrize("name,options,needle", [
    ("linreg", {"d": 0}, "d"), ("linreg", {"n": "lots"}, "n"), ("digits", {"hidden": 2.5}, "hidden"),
    ("digits", {"test_fraction": 1.0}, "test_fraction"), ("mf", {"density": 0.0}, "density"),
    ("mf", {"biases": "maybe"}, "biases"), ("charlm", {"d_model": 30, "heads": 4}, "d_model"),
    ("charlm", {"max_chars": 10}, "max_chars"), ("linreg", {"data_seed": -1}, "data_seed"),
])
def test_out_of_range_or_mistyped_options_raise_naming_them(name, options, needle):
    with pytest.raises(ValueError, match=needle):
        get_workload(name, **options)


def test_seed_must_be_a_nonnegative_integer():
    for seed in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed"):
            get_workload("linreg", seed=seed)


def test_options_given_as_strings_are_converted():
    wl = get_workload("mf", users="50", items="40", biases="false", noise="0.2")
    assert dict(wl.options) == {**dict(wl.options), "users": 50, "items": 40, "biases": False, "noise": 0.2}
    assert not hasattr(wl.build_model(), "user_bias") or wl.build_model().user_bias is None


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", NAMES)
def test_model_build_depends_only_on_seed(name, workloads):
    wl = workloads[name]
    torch.manual_seed(1234)
    a = params_of(wl.build_model())
    torch.manual_seed(999)
    b = params_of(get_workload(name, seed=0).build_model())
    c = params_of(get_workload(name, seed=1).build_model())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("name", NAMES)
def test_model_build_leaves_the_global_rng_alone(name, workloads):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    workloads[name].build_model()
    assert torch.equal(torch.rand(3), expected)


def test_data_depends_on_data_seed_not_on_seed():
    w0, b0 = get_workload("linreg", seed=0).true_weights()
    w1, b1 = get_workload("linreg", seed=5).true_weights()
    w2, _ = get_workload("linreg", seed=0, data_seed=1).true_weights()
    assert torch.equal(w0, w1) and torch.equal(b0, b1)
    assert not torch.equal(w0, w2)


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", NAMES)
def test_batches_of_ranks_are_disjoint_and_each_covers_its_partition_per_epoch(name, workloads):
    wl = workloads[name]
    world, bs = 3, wl.defaults.batch_size
    seen = []
    for rank in range(world):
        part = wl.rank_indices(rank, world)
        assert part == partition(wl.num_train, rank, world)
        stream = wl.batch_indices(rank, world)
        per_epoch = math.ceil(len(part) / bs)
        epoch0 = [next(stream) for _ in range(per_epoch)]
        epoch1 = [next(stream) for _ in range(per_epoch)]
        assert all(len(b) == bs for b in epoch0[:-1])
        for epoch in (epoch0, epoch1):
            assert sorted(torch.cat(epoch).tolist()) == list(part)
        assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1)), "epochs must be reshuffled"
        seen.append(set(torch.cat(epoch0).tolist()))
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == wl.num_train


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_deterministic_and_made_from_the_indexed_examples(name, workloads):
    wl = workloads[name]
    a, b = wl.batches(1, 2), get_workload(name, seed=0).batches(1, 2)
    other_seed = get_workload(name, seed=1).batch_indices(1, 2)
    indices = wl.batch_indices(1, 2)
    for _ in range(3):
        x, y, idx = next(a), next(b), next(indices)
        assert all(torch.equal(s, t) for s, t in zip(x, y))
        assert all(torch.equal(s, t) for s, t in zip(x, wl._make_batch(idx)))
        assert len(x[0]) == wl.defaults.batch_size
    assert not torch.equal(next(wl.batch_indices(1, 2)), next(other_seed))


def test_batch_size_defaults_and_can_be_overridden(workloads):
    wl = workloads["digits"]
    assert len(next(wl.batches(0, 4))[0]) == wl.defaults.batch_size
    assert len(next(wl.batches(0, 4, batch_size=5))[0]) == 5
    # A batch larger than the rank's partition is the whole (reshuffled) partition.
    assert len(next(wl.batches(0, 4, batch_size=10_000))[0]) == len(partition(wl.num_train, 0, 4))


@pytest.mark.parametrize("rank,world,bs,needle", [
    (4, 4, None, "rank"), (0, 0, None, "world"), (0, 1, 0, "batch_size"), (0, 1, 2.0, "batch_size"),
    (99_999, 100_000, None, "no training examples"),
])
def test_batches_validate_when_called_not_when_first_drawn(rank, world, bs, needle, workloads):
    with pytest.raises(ValueError, match=needle):
        workloads["linreg"].batches(rank, world, bs)


def test_charlm_batches_are_bytes_with_targets_shifted_by_one(workloads):
    wl = workloads["charlm"]
    assert isinstance(wl, CharLM) and wl.source_files and len(wl.corpus_sha256) == 64
    x, y = next(wl.batches(0, 2))
    ctx = wl.options["context"]
    assert x.shape == y.shape == (wl.defaults.batch_size, ctx)
    assert x.dtype == y.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < CharLM.VOCAB
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_charlm_predictions_do_not_see_later_bytes_in_training_or_evaluation(workloads):
    wl = workloads["charlm"]
    model = wl.build_model()
    x, _ = next(wl.batches(0, 1, batch_size=4))
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % CharLM.VOCAB
    for train_mode in (True, False):
        model.train(train_mode)
        with torch.no_grad():
            a, b = model(x), model(changed)
        assert torch.allclose(a[:, :40], b[:, :40], atol=1e-5)
        assert not torch.allclose(a[:, 40:], b[:, 40:])
    with torch.no_grad():                      # eval mode (torch's fast path) agrees with train mode
        model.eval()
        fast = model(x)
        model.train()
        assert torch.allclose(fast, model(x), atol=1e-4)


# --------------------------------------------------------------------------- loss and metrics
@pytest.mark.parametrize("name", NAMES)
def test_loss_is_a_finite_scalar_with_gradients_for_every_parameter(name, workloads):
    wl = workloads[name]
    model = wl.build_model()
    loss = wl.loss(model, next(wl.batches(0, 1)))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_is_cheap_finite_and_restores_the_mode(name, workloads):
    wl = workloads[name]
    model = wl.build_model()
    before = params_of(model)
    model.train()
    best = math.inf
    for _ in range(20):       # best of a few: other processes may be sharing the cores
        t0 = time.perf_counter()
        metric = wl.evaluate(model)
        best = min(best, time.perf_counter() - t0)
        if best < 0.5:
            break
    assert best < 0.5, f"evaluate took {best:.3f} s"
    assert math.isfinite(metric) and math.isfinite(wl.eval_loss(model))
    assert model.training
    model.eval()
    wl.evaluate(model)
    wl.eval_loss(model)
    assert not model.training
    assert all(torch.equal(x, y) for x, y in zip(before, params_of(model)))
    assert all(p.grad is None for p in model.parameters())


def test_metrics_are_consistent_with_held_out_losses(workloads):
    for name, relation in (("mf", math.sqrt), ("charlm", lambda v: v / math.log(2))):
        wl = workloads[name]
        model = wl.build_model()
        assert wl.evaluate(model) == pytest.approx(relation(wl.eval_loss(model)))
    # An untrained byte model is near uniform: about 8 bits per byte.
    assert 7.0 < workloads["charlm"].evaluate(workloads["charlm"].build_model()) < 9.0


def test_linreg_weight_distance_is_zero_at_the_true_weights(workloads):
    wl = workloads["linreg"]
    assert isinstance(wl, LinearRegression)
    model = wl.build_model()
    w, b = wl.true_weights()
    assert wl.evaluate(model) > 1.0
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    assert wl.evaluate(model) == pytest.approx(0.0, abs=1e-6)
    assert wl.eval_loss(model) == pytest.approx(wl.options["noise"] ** 2, rel=0.2)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name,steps,check", [
    ("linreg", None, lambda before, after: after < 0.1),
    ("digits", None, lambda before, after: after > 0.85),
    ("mf", None, lambda before, after: after < 0.7 * before),
    ("charlm", 30, lambda before, after: after < before - 2.0),
])
def test_short_local_training_improves_the_metric(name, steps, check, workloads):
    wl = workloads[name]
    model = wl.build_model()
    before = wl.evaluate(model)
    train_locally(wl, model, steps or wl.defaults.quick_steps)
    after = wl.evaluate(model)
    assert check(before, after), f"{name} {wl.metric_name}: {before:.4f} -> {after:.4f}"
    if wl.higher_is_better:
        assert after > before
    else:
        assert after < before


@pytest.mark.parametrize("name", ["linreg", "digits", "mf"])
def test_defaults_reach_target_with_four_workers_and_stale_gradients(name, workloads):
    wl = workloads[name]
    model = wl.build_model()
    train_locally(wl, model, 4 * wl.defaults.steps, world=4, delay=4)
    metric = wl.evaluate(model)
    reached = metric >= wl.defaults.target if wl.higher_is_better else metric <= wl.defaults.target
    assert reached, f"{name} {wl.metric_name} {metric:.4f} misses target {wl.defaults.target}"
