"""Built-in workloads: a model, its data and its metric, with no download.

A workload is what one zps job trains.  Every process of a job (workers, the
evaluator, a benchmark) builds the same workload from the same ``(name, seed,
options)`` and so sees the same data, the same partition of it and the same
initial model::

    wl = get_workload("digits", seed=3, hidden=64)
    model = wl.build_model()                 # depends only on seed and options
    it = wl.batches(rank, world)             # this rank's endless, reshuffled stream
    loss = wl.loss(model, next(it)); loss.backward()
    wl.evaluate(model)                       # held-out metric (wl.metric_name)

    name     model                                   data                          metric (better)
    -------  --------------------------------------  ----------------------------  -----------------------
    linreg   nn.Linear(d, 1)                         synthetic y = X w* + b* + e   weight_distance (lower)
    digits   MLP 64 -> hidden -> 10 (ReLU)           scikit-learn's load_digits    accuracy (higher)
    mf       user/item embeddings (+ biases)         synthetic low-rank matrix     rmse (lower)
    charlm   2-block causal transformer over bytes   the stdlib's .py sources      bits_per_char (lower)

Determinism.  The data (synthetic values, the held-out split, the order of
training examples) depends only on the ``data_seed`` option, so runs with
different ``seed`` train the same problem; ``seed`` drives the model's
initialisation and the per-epoch shuffles.  Training example ``i`` of rank
``r`` of ``world`` comes from ``partition(num_train, r, world)``; each epoch
the rank reshuffles its partition with a generator seeded by
``(seed, rank, epoch)`` and walks it in batches (the last one of an epoch may
be short), so within an epoch the ranks' batches are disjoint and each rank's
batches cover its partition exactly.

``charlm`` reads the running interpreter's standard library, so its text, and
therefore its metric, can differ between Python versions; ``source_files`` and
``corpus_sha256`` say what was read.  All processes of a job should run the
same Python.

Options are keyword arguments of the constructor.  Unknown options raise
:class:`~common.errors.ConfigError` (a ``ValueError``) naming them; values may
also be given as strings (``"4096"``, ``"true"``), as a command line hands them
over.  Batches are CPU tensors; ``loss``/``evaluate`` move them to the model's
device.

Defaults.  Each ``defaults`` was tuned on a 2-core CPU so that one process
reaches ``target`` within ``steps`` and four workers of ``steps`` each reach
it with gradients computed on weights several updates old (the ``sgd``
learning rates of linreg and digits are held low for that reason: with
un-centred [0, 1] inputs digits diverges under staleness at lr 0.1 or with
momentum 0.9).  These models are far too small to gain from torch's
intra-op threads; when several worker processes share a machine, give each
``torch.set_num_threads(1)``, or oversubscribed threads can slow steps a
hundredfold.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import math
import os
import sysconfig
import types
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

__all__ = ["WorkloadDefaults", "Workload", "LinearRegression", "Digits", "MatrixFactorization",
           "CharLM", "WORKLOADS", "get_workload", "partition"]


# --------------------------------------------------------------------------- helpers
def partition(n: int, rank: int, world: int) -> range:
    """The indices ``rank`` owns of ``range(n)`` split into ``world`` contiguous near-equal parts.

    The first ``n % world`` ranks get one extra index.  A rank may get an
    empty range when ``world > n``.
    """
    for label, value in (("n", n), ("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"partition: {label} must be an integer, got {value!r}")
    if n < 0:
        raise ConfigError(f"partition: n must be >= 0, got {n}")
    if world < 1:
        raise ConfigError(f"partition: world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ConfigError(f"partition: rank must be in [0, {world}), got {rank}")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _coerce(workload: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default``; ConfigError naming the option if it cannot be."""
    def bad() -> ConfigError:
        return ConfigError(f"{workload}: option {key}={value!r} is not a valid "
                           f"{type(default).__name__}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise bad()
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float, np.integer, np.floating)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(out):
            raise bad()
        return out
    raise TypeError(f"option {key}: unsupported default type {type(default).__name__}")


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _seeded_init(seed: int, make: Any) -> nn.Module:
    """``make()`` with torch's global RNG seeded by ``seed``; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --------------------------------------------------------------------------- interface
@dataclasses.dataclass(frozen=True)
class WorkloadDefaults:
    """Training settings that make a workload reach a useful metric."""

    optimizer: str          # "sgd", "adam", ... (server-side optimizer name)
    lr: float
    momentum: float         # for sgd
    batch_size: int         # per worker
    steps: int              # default number of iterations per worker for a full run
    quick_steps: int        # iterations per worker for a quick (test) run
    target: float           # a reasonable target metric value (for time-to-target)

    def __post_init__(self) -> None:
        if not self.optimizer:
            raise ConfigError("WorkloadDefaults: optimizer must be a non-empty name")
        if not self.lr > 0:
            raise ConfigError(f"WorkloadDefaults: lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"WorkloadDefaults: momentum must be in [0, 1), got {self.momentum}")
        for key in ("batch_size", "steps", "quick_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"WorkloadDefaults: {key} must be >= 1, got {getattr(self, key)}")


class Workload(abc.ABC):
    """A model, a training set partitioned across ranks, a loss and a held-out metric.

    Subclasses set the class attributes, list their options with defaults in
    ``OPTIONS``, and implement ``_prepare`` (build the data), ``num_train``,
    ``_make_batch``, ``build_model``, ``loss``, ``evaluate`` and ``eval_loss``.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    defaults: ClassVar[WorkloadDefaults]
    OPTIONS: ClassVar[Mapping[str, Any]] = {}
    COMMON_OPTIONS: ClassVar[Mapping[str, Any]] = {"data_seed": 0}

    def __init__(self, seed: int = 0, **options: Any):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"{self.name}: seed must be an integer >= 0, got {seed!r}")
        known = {**self.COMMON_OPTIONS, **self.OPTIONS}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                              f"known options: {', '.join(sorted(known))}")
        opts = {k: _coerce(self.name, k, options.get(k, d), d) for k, d in known.items()}
        if opts["data_seed"] < 0:
            raise ConfigError(f"{self.name}: option data_seed must be >= 0, got {opts['data_seed']}")
        self.seed = int(seed)
        self.options: Mapping[str, Any] = types.MappingProxyType(opts)
        self._check_options()
        self._prepare()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(seed={self.seed}, {opts})"

    # ------------------------------------------------------------ subclass hooks
    def _check_options(self) -> None:
        """Raise ConfigError for option values out of range."""

    def _require(self, condition: bool, key: str, requirement: str) -> None:
        if not condition:
            raise ConfigError(f"{self.name}: option {key} must be {requirement}, got {self.options[key]!r}")

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Build the training and held-out data from the options."""

    @property
    @abc.abstractmethod
    def num_train(self) -> int:
        """Number of training examples (the unit that ranks partition)."""

    @abc.abstractmethod
    def _make_batch(self, indices: torch.Tensor) -> Any:
        """The batch made of the training examples at ``indices`` (a 1-D int64 tensor)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model; its parameters depend only on seed and options."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The held-out metric (``metric_name``)."""

    @abc.abstractmethod
    def eval_loss(self, model: nn.Module) -> float:
        """The held-out loss, in the units of ``loss``."""

    # ------------------------------------------------------------ data streams
    def rank_indices(self, rank: int, world: int) -> range:
        """The training examples ``rank`` of ``world`` trains on."""
        part = partition(self.num_train, rank, world)
        if len(part) == 0:
            raise ConfigError(f"{self.name}: rank {rank} of world {world} gets no training examples "
                              f"(only {self.num_train}); use fewer workers or more data")
        return part

    def batch_indices(self, rank: int, world: int, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """Endless stream of the index tensors ``batches`` draws its batches from."""
        part = self.rank_indices(rank, world)
        bs = self.defaults.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
            raise ConfigError(f"{self.name}: batch_size must be an integer >= 1, got {batch_size!r}")
        return self._index_stream(part, int(rank), int(bs))

    def _index_stream(self, part: range, rank: int, bs: int) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, rank, epoch])
            order = torch.from_numpy(rng.permutation(len(part)) + part.start)
            for start in range(0, len(part), bs):
                yield order[start:start + bs]
            epoch += 1

    def batches(self, rank: int, world: int, batch_size: int | None = None) -> Iterator[Any]:
        """Endless, deterministic stream of batches from this rank's partition.

        ``batch_size`` defaults to ``defaults.batch_size``; rank, world and
        batch size are checked when this is called, not at the first ``next``.
        """
        return map(self._make_batch, self.batch_indices(rank, world, batch_size))


# --------------------------------------------------------------------------- linreg
class LinearRegression(Workload):
    """y = X w* + b* + noise with standard-normal X, w*, b*; the model should recover (w*, b*)."""

    name = "linreg"
    metric_name = "weight_distance"
    higher_is_better = False
    defaults = WorkloadDefaults(optimizer="sgd", lr=0.02, momentum=0.0, batch_size=32,
                                steps=300, quick_steps=150, target=0.05)
    OPTIONS = {"n": 4096, "d": 32, "noise": 0.1, "n_eval": 1024}

    def _check_options(self) -> None:
        o = self.options
        self._require(o["n"] >= 1, "n", ">= 1")
        self._require(o["d"] >= 1, "d", ">= 1")
        self._require(o["noise"] >= 0, "noise", ">= 0")
        self._require(o["n_eval"] >= 1, "n_eval", ">= 1")

    def _prepare(self) -> None:
        o = self.options
        g = torch.Generator().manual_seed(o["data_seed"])
        d = o["d"]
        self._w = torch.randn(1, d, generator=g)
        self._b = torch.randn(1, generator=g)

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, d, generator=g)
            y = x @ self._w[0] + self._b + o["noise"] * torch.randn(n, generator=g)
            return x, y

        self._x, self._y = sample(o["n"])
        self._x_eval, self._y_eval = sample(o["n_eval"])

    @property
    def num_train(self) -> int:
        return self.options["n"]

    def true_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (w* shaped like ``nn.Linear.weight`` [1, d], b* shaped [1])."""
        return self._w.clone(), self._b.clone()

    def _make_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x[indices], self._y[indices]

    def build_model(self) -> nn.Module:
        return _seeded_init(self.seed, lambda: nn.Linear(self.options["d"], 1))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dev = _device_of(model)
        x, y = batch
        return F.mse_loss(model(x.to(dev)).squeeze(-1), y.to(dev))

    def evaluate(self, model: nn.Module) -> float:
        with _evaluating(model):
            learned = torch.cat([model.weight.detach().reshape(-1), model.bias.detach().reshape(-1)])
            true = torch.cat([self._w.reshape(-1), self._b]).to(learned.device)
            return float(torch.linalg.vector_norm(learned - true))

    def eval_loss(self, model: nn.Module) -> float:
        with _evaluating(model):
            return float(self.loss(model, (self._x_eval, self._y_eval)))


# --------------------------------------------------------------------------- digits
class Digits(Workload):
    """An MLP on scikit-learn's bundled 8x8 digits (1797 images, no download)."""

    name = "digits"
    metric_name = "accuracy"
    higher_is_better = True
    defaults = WorkloadDefaults(optimizer="sgd", lr=0.05, momentum=0.0, batch_size=32,
                                steps=500, quick_steps=400, target=0.9)
    OPTIONS = {"hidden": 64, "test_fraction": 0.2}

    def _check_options(self) -> None:
        self._require(self.options["hidden"] >= 1, "hidden", ">= 1")
        self._require(0 < self.options["test_fraction"] < 1, "test_fraction", "in (0, 1)")

    def _prepare(self) -> None:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as exc:
            raise ConfigError(f"{self.name}: this workload needs scikit-learn, which bundles the "
                              f"data set (pip install scikit-learn)") from exc

        data = load_digits()
        x = data.data.astype(np.float32) / 16.0
        y = data.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=self.options["test_fraction"], stratify=y,
            random_state=self.options["data_seed"], shuffle=True)
        self._x, self._y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        self._x_eval, self._y_eval = torch.from_numpy(x_te), torch.from_numpy(y_te)

    @property
    def num_train(self) -> int:
        return len(self._y)

    def _make_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x[indices], self._y[indices]

    def build_model(self) -> nn.Module:
        h = self.options["hidden"]
        return _seeded_init(self.seed, lambda: nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10)))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dev = _device_of(model)
        x, y = batch
        return F.cross_entropy(model(x.to(dev)), y.to(dev))

    def evaluate(self, model: nn.Module) -> float:
        with _evaluating(model):
            dev = _device_of(model)
            pred = model(self._x_eval.to(dev)).argmax(dim=1)
            return float((pred == self._y_eval.to(dev)).float().mean())

    def eval_loss(self, model: nn.Module) -> float:
        with _evaluating(model):
            return float(self.loss(model, (self._x_eval, self._y_eval)))


# --------------------------------------------------------------------------- mf
class FactorizationModel(nn.Module):
    """Prediction ``<user_emb[u], item_emb[i]> (+ user_bias[u] + item_bias[i])``."""

    def __init__(self, users: int, items: int, dim: int, biases: bool, init_std: float):
        super().__init__()
        self.user_emb = nn.Embedding(users, dim)
        self.item_emb = nn.Embedding(items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self.user_bias = nn.Embedding(users, 1) if biases else None
        self.item_bias = nn.Embedding(items, 1) if biases else None
        if biases:
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        pred = (self.user_emb(users) * self.item_emb(items)).sum(dim=-1)
        if self.user_bias is not None:
            pred = pred + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1)
        return pred


class MatrixFactorization(Workload):
    """Completion of a synthetic rank-``rank`` matrix (plus user/item offsets) from noisy entries.

    Entry (u, i) is ``<U*_u, V*_i> + a_u + c_i + noise`` with entries of U*, V*
    drawn N(0, 1/sqrt(rank)) (so the product has unit variance) and offsets
    N(0, 0.5^2).  ``density`` of the entries are observed; ``test_fraction``
    of those are held out.  A batch is ``(user ids, item ids, values)``.
    """

    name = "mf"
    metric_name = "rmse"
    higher_is_better = False
    defaults = WorkloadDefaults(optimizer="adam", lr=0.01, momentum=0.0, batch_size=256,
                                steps=600, quick_steps=300, target=0.3)
    OPTIONS = {"users": 300, "items": 200, "rank": 8, "dim": 8, "density": 0.3,
               "test_fraction": 0.1, "noise": 0.1, "biases": True, "l2": 0.0, "init_std": 0.1}

    def _check_options(self) -> None:
        o = self.options
        for key in ("users", "items", "rank", "dim"):
            self._require(o[key] >= 1, key, ">= 1")
        self._require(0 < o["density"] <= 1, "density", "in (0, 1]")
        self._require(0 < o["test_fraction"] < 1, "test_fraction", "in (0, 1)")
        self._require(o["noise"] >= 0, "noise", ">= 0")
        self._require(o["l2"] >= 0, "l2", ">= 0")
        self._require(o["init_std"] > 0, "init_std", "> 0")
        observed = round(o["density"] * o["users"] * o["items"])
        n_test = round(o["test_fraction"] * observed)
        if n_test < 1 or observed - n_test < 1:
            raise ConfigError(f"{self.name}: {observed} observed entries leave an empty training or "
                              f"held-out set (density={o['density']}, test_fraction={o['test_fraction']})")

    def _prepare(self) -> None:
        o = self.options
        g = torch.Generator().manual_seed(o["data_seed"])
        users, items, rank = o["users"], o["items"], o["rank"]
        scale = rank ** -0.25
        u_true = torch.randn(users, rank, generator=g) * scale
        v_true = torch.randn(items, rank, generator=g) * scale
        a_true = 0.5 * torch.randn(users, generator=g)
        c_true = 0.5 * torch.randn(items, generator=g)
        observed = round(o["density"] * users * items)
        n_test = round(o["test_fraction"] * observed)
        flat = torch.randperm(users * items, generator=g)[:observed]
        u, i = flat // items, flat % items
        values = ((u_true[u] * v_true[i]).sum(-1) + a_true[u] + c_true[i]
                  + o["noise"] * torch.randn(observed, generator=g))
        self._u_eval, self._i_eval, self._v_eval = u[:n_test], i[:n_test], values[:n_test]
        self._u, self._i, self._v = u[n_test:], i[n_test:], values[n_test:]

    @property
    def num_train(self) -> int:
        return len(self._v)

    def _make_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._u[indices], self._i[indices], self._v[indices]

    def build_model(self) -> nn.Module:
        o = self.options
        return _seeded_init(self.seed, lambda: FactorizationModel(
            o["users"], o["items"], o["dim"], o["biases"], o["init_std"]))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean squared error, plus ``l2`` times the mean squared norm of the rows the batch uses."""
        dev = _device_of(model)
        u, i, v = (t.to(dev) for t in batch)
        loss = F.mse_loss(model(u, i), v)
        if self.options["l2"] > 0:
            reg = model.user_emb(u).pow(2).sum(-1) + model.item_emb(i).pow(2).sum(-1)
            loss = loss + self.options["l2"] * reg.mean()
        return loss

    def eval_loss(self, model: nn.Module) -> float:
        """Held-out mean squared error (the L2 penalty, a property of the weights, is left out)."""
        with _evaluating(model):
            dev = _device_of(model)
            pred = model(self._u_eval.to(dev), self._i_eval.to(dev))
            return float(F.mse_loss(pred, self._v_eval.to(dev)))

    def evaluate(self, model: nn.Module) -> float:
        return math.sqrt(self.eval_loss(model))


# --------------------------------------------------------------------------- charlm
class CharTransformer(nn.Module):
    """Token + position embeddings, pre-norm causal transformer blocks, a final norm and a byte head."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int, ff: int):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        # Separate constructions (not nn.TransformerEncoder's deep copies) so blocks start different.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ConfigError(f"sequence length {t} exceeds the model's context {self.context}")
        h = self.tok(tokens) + self.pos.weight[:t]
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def _read_stdlib_sources(max_chars: int) -> tuple[bytes, tuple[str, ...]]:
    """Up to ``max_chars`` bytes of the stdlib's .py files, walked in sorted order.

    In each directory its files come first (sorted), then its subdirectories
    (sorted); installed packages and caches are skipped.  The last file read
    is cut to fit exactly.
    """
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    chunks: list[bytes] = []
    files: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for fname in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, fname)
            try:
                with open(path, "rb") as fh:
                    data = fh.read(max_chars - total)
            except OSError:
                continue        # unreadable file: the selection is what can be read
            if not data:
                continue
            chunks.append(data)
            files.append(os.path.relpath(path, root).replace(os.sep, "/"))
            total += len(data)
            if total >= max_chars:
                return b"".join(chunks), tuple(files)
    return b"".join(chunks), tuple(files)


class CharLM(Workload):
    """Byte-level causal transformer language model over the standard library's Python sources.

    The text's last ``eval_fraction`` is held out.  Training examples are the
    non-overlapping windows of ``context + 1`` bytes (input and shifted target)
    of the rest, in a fixed ``data_seed`` order so every rank sees a mix of
    files.  The held-out metric uses ``eval_windows`` windows spread evenly
    over the held-out text.  A batch is ``(inputs, targets)``, int64 [B, context].
    """

    name = "charlm"
    metric_name = "bits_per_char"
    higher_is_better = False
    defaults = WorkloadDefaults(optimizer="adam", lr=2e-3, momentum=0.0, batch_size=32,
                                steps=600, quick_steps=30, target=3.2)
    OPTIONS = {"max_chars": 1_500_000, "context": 64, "d_model": 64, "heads": 4, "layers": 2,
               "ff": 256, "eval_fraction": 0.05, "eval_windows": 128}
    VOCAB = 256

    def _check_options(self) -> None:
        o = self.options
        for key in ("context", "d_model", "heads", "layers", "ff", "eval_windows"):
            self._require(o[key] >= 1, key, ">= 1")
        self._require(o["d_model"] % o["heads"] == 0, "d_model", f"a multiple of heads={o['heads']}")
        self._require(0 < o["eval_fraction"] < 1, "eval_fraction", "in (0, 1)")
        self._require(o["max_chars"] >= 4 * (o["context"] + 1), "max_chars",
                      f">= {4 * (o['context'] + 1)} (four windows of context + 1)")

    def _prepare(self) -> None:
        o = self.options
        text, files = _read_stdlib_sources(o["max_chars"])
        self.source_files = files
        self.corpus_sha256 = hashlib.sha256(text).hexdigest()
        window = o["context"] + 1
        n_eval_chars = max(window, int(len(text) * o["eval_fraction"]))
        if len(text) - n_eval_chars < window:
            raise ConfigError(f"{self.name}: read only {len(text)} bytes of Python sources under "
                              f"{sysconfig.get_paths()['stdlib']}; too little for context {o['context']}")
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        self._train_text = data[:-n_eval_chars]
        self._eval_text = data[-n_eval_chars:]
        n_windows = (len(self._train_text) - 1) // o["context"]
        g = torch.Generator().manual_seed(o["data_seed"])
        self._starts = torch.randperm(n_windows, generator=g) * o["context"]
        n_eval_windows = min(o["eval_windows"], (len(self._eval_text) - 1) // o["context"])
        last = len(self._eval_text) - window
        eval_starts = torch.linspace(0, last, n_eval_windows).round().long()
        self._eval_batch = self._windows(self._eval_text, eval_starts)

    def _windows(self, text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.options["context"]
        idx = starts.unsqueeze(1) + torch.arange(ctx + 1)
        w = text[idx]
        return w[:, :-1], w[:, 1:]

    @property
    def num_train(self) -> int:
        return len(self._starts)

    def _make_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self._train_text, self._starts[indices])

    def build_model(self) -> nn.Module:
        o = self.options
        return _seeded_init(self.seed, lambda: CharTransformer(
            self.VOCAB, o["context"], o["d_model"], o["heads"], o["layers"], o["ff"]))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dev = _device_of(model)
        x, y = batch
        logits = model(x.to(dev))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(dev).reshape(-1))

    def eval_loss(self, model: nn.Module) -> float:
        """Held-out cross-entropy in nats per byte."""
        with _evaluating(model):
            return float(self.loss(model, self._eval_batch))

    def evaluate(self, model: nn.Module) -> float:
        return self.eval_loss(model) / math.log(2)


# --------------------------------------------------------------------------- registry
WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls for cls in (LinearRegression, Digits, MatrixFactorization, CharLM)
}


def get_workload(name: str, seed: int = 0, **options: Any) -> Workload:
    """The built-in workload ``name`` built with ``seed`` and ``options``."""
    try:
        cls = WORKLOADS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown workload {name!r}; known workloads: {', '.join(sorted(WORKLOADS))}") from None
    return cls(seed, **options)
