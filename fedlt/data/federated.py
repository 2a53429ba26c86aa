"""The data as a run uses it: long-tailed training set, client index arrays, local test views.

Built once per run from the scenario, deterministically from its seed. Tensors live on the
run's device; clients hold index arrays into them, never copies.

This is the scenario's second boundary (the first is :mod:`fedlt.scenario.config`, which checks every rule
the scenario alone decides): what only the data or the machine can tell (a root folder that does
not exist, a broken archive, a model that does not fit the samples' shape, more clients or tasks
than samples, data that cannot fit in memory) is raised by library code as a plain error and
turned into a :class:`~fedlt.errors.ScenarioError` here, by :func:`_boundary`, and nowhere deeper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlt.base.memory import available_memory
from fedlt.base.registry import ParameterError
from fedlt.base.seeding import numpy_rng
from fedlt.data.clients import class_counts, client_class_counts, local_test_views
from fedlt.data.datasets import RawDataset, estimate_bytes, known_train_size, load_dataset, to_tensor
from fedlt.data.imagefolder import ImageFolderError
from fedlt.data.longtail import long_tail_counts, subsample_long_tail
from fedlt.data.noise import (
    apply_noise,
    class_rates,
    noise_summary,
    noisy_class_counts,
    resolve_map,
    transition_matrix,
)
from fedlt.data.ood import hold_out_classes, ood_dataset_tensor
from fedlt.data.partition import partition
from fedlt.data.stream import ClientStream, TaskSchedule, build_stream, check_task_count, shared_schedule
from fedlt.errors import ScenarioError

__all__ = [
    "FederatedData",
    "available_memory",
    "build_federated_data",
    "check_data_feasible",
    "with_client_samples",
]

_GIB = 2**30


@dataclass
class FederatedData:
    """Training/test tensors on the device plus each client's indices and local test view."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_class_counts: np.ndarray
    client_indices: list[np.ndarray]
    client_counts: np.ndarray
    test_views: list[np.ndarray]
    #: Continual scenarios: each client's task stream over its indices (``None`` offline).
    streams: list[ClientStream] | None = None
    #: The one class-to-task assignment every stream follows (``stream.schedule = "shared"``), else None.
    schedule: TaskSchedule | None = None
    #: The scenario's ``[stream]`` settings the streams were built with (``None`` offline).
    stream_settings: dict[str, Any] | None = None
    #: With ``[noise]``: the clean training labels (``y_train`` holds the noisy ones), else None.
    y_train_clean: torch.Tensor | None = None
    #: With ``[noise]``: :func:`fedlt.data.noise.noise_summary` plus ``per_client`` (K, C) noisy counts.
    noise: dict[str, Any] | None = None
    #: With ``[eval.ood]``: the out-of-distribution test inputs (normalised as ``x_test``), else None.
    x_ood: torch.Tensor | None = None
    #: With ``[eval.ood]``: ``kind``, ``n_ood`` and (held-out classes) ``held_out`` and ``class_ids``
    #: (the dataset's original id of each class the run uses) or (dataset) ``dataset``.
    ood: dict[str, Any] | None = None

    @property
    def n_clients(self) -> int:
        return len(self.client_indices)

    @property
    def y_train_np(self) -> np.ndarray:
        """Training labels as a host numpy array (cached), for bookkeeping off the device."""
        if "_y_np" not in self.__dict__:
            self.__dict__["_y_np"] = self.y_train.cpu().numpy()
        return self.__dict__["_y_np"]

    def client_tensor(self, client_id: int) -> torch.Tensor:
        """The client's training indices as a long tensor on the data's device (cached)."""
        cache = self.__dict__.setdefault("_index_tensors", {})
        if client_id not in cache:
            cache[client_id] = torch.as_tensor(self.client_indices[client_id], device=self.x_train.device)
        return cache[client_id]

    def to_shared(self) -> dict[str, Any]:
        """The training side as numpy arrays and metadata: what remote workers need.

        Put into Ray's object store once, the arrays are read zero-copy by every worker on the
        node. The test set stays with the driver, which evaluates.
        """
        return {
            "meta": {
                "name": self.name,
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "input_shape": self.input_shape,
            },
            "x_train": self.x_train.cpu().numpy(),
            "y_train": self.y_train.cpu().numpy(),
            "train_class_counts": self.train_class_counts,
            "client_indices": self.client_indices,
            "client_counts": self.client_counts,
        }

    @classmethod
    def from_shared(cls, shared: dict[str, Any], device: torch.device | str = "cpu") -> FederatedData:
        """Rebuild (training side only) from :meth:`to_shared`; CPU arrays are used without copying."""
        import warnings

        with warnings.catch_warnings():
            # Object-store arrays are read-only; training never writes to the data tensors.
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(shared["x_train"]).to(device)
            y = torch.from_numpy(shared["y_train"]).to(device)
        empty = torch.empty((0, *x.shape[1:]), dtype=x.dtype, device=device)
        return cls(
            **shared["meta"],
            x_train=x,
            y_train=y,
            x_test=empty,
            y_test=torch.empty(0, dtype=torch.long, device=device),
            train_class_counts=shared["train_class_counts"],
            client_indices=shared["client_indices"],
            client_counts=shared["client_counts"],
            test_views=[np.empty(0, dtype=np.int64) for _ in shared["client_indices"]],
        )

    def describe(self, with_indices: bool = False) -> dict[str, Any]:
        """What `fedlt inspect --json` prints: counts after the long tail, per client, views, streams.

        Parameters
        ----------
        with_indices : bool, default=False
            Also list each client's training indices and, in continual scenarios, each task's
            indices in visit order (large, so only when asked).

        Returns
        -------
        dict
            ``dataset``, ``num_classes``, ``class_names``, ``train_class_counts``, ``n_train``,
            ``n_test`` and one row per client (``id``, ``n_samples``, ``class_counts``,
            ``test_view_size``; continual scenarios add ``tasks``, one row per task as
            :meth:`ClientStream.describe` gives it with class counts). Continual scenarios add
            ``stream`` (the settings) and, with a shared schedule, ``schedule``. With ``[noise]``:
            ``noise`` (:func:`fedlt.data.noise.noise_summary`) and per client ``n_noisy`` and
            ``noisy_class_counts`` (its noisy samples per clean class); ``class_counts`` are then
            of the noisy labels, as the client sees them.
        """
        labels = self.y_train_np
        clients = []
        for k in range(self.n_clients):
            row: dict[str, Any] = {
                "id": k,
                "n_samples": int(self.client_counts[k].sum()),
                "class_counts": self.client_counts[k].tolist(),
                "test_view_size": len(self.test_views[k]),
            }
            if with_indices:
                row["indices"] = [int(i) for i in self.client_indices[k]]
            if self.streams is not None:
                row["tasks"] = self.streams[k].describe(labels, self.num_classes, with_indices=with_indices)
            if self.noise is not None:  # class_counts are of the noisy labels, as the client sees them
                row["noisy_class_counts"] = self.noise["per_client"][k].tolist()
                row["n_noisy"] = int(self.noise["per_client"][k].sum())
            clients.append(row)
        out: dict[str, Any] = {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_class_counts": self.train_class_counts.tolist(),
            "n_train": int(self.train_class_counts.sum()),
            "n_test": int(self.y_test.numel()),
            "clients": clients,
        }
        if self.streams is not None and self.stream_settings is not None:
            out["stream"] = dict(self.stream_settings)
        if self.schedule is not None:
            out["schedule"] = self.schedule.describe()
        if self.noise is not None:
            out["noise"] = {k: v for k, v in self.noise.items() if k != "per_client"}
        if self.ood is not None:
            out["ood"] = dict(self.ood)
        return out


# --------------------------------------------------------------------------- the boundary


@contextmanager
def _boundary(scenario: Any, section: str) -> Iterator[None]:
    """Turn the plain errors library code raises about the scenario into scenario errors.

    The one place this happens. ``section`` is the scenario section the wrapped step reads
    (``"data"``, ``"model"``, ``"partition"``): a :class:`~fedlt.base.registry.ParameterError` names a
    parameter of it. An :class:`~fedlt.data.imagefolder.ImageFolderError` names its own key. An
    ``OSError`` while loading data (permissions, a failed download) is about ``data.root``. Other
    errors are bugs and pass through unchanged.
    """
    try:
        yield
    except ImageFolderError as exc:
        field = exc.key.partition(".")[2]
        value = exc.value if exc.value is not None else getattr(scenario.data, field, None)
        raise ScenarioError(exc.key, value, exc.allowed, exc.hint) from None
    except ParameterError as exc:
        raise ScenarioError(f"{section}.{exc.param}", exc.value, exc.allowed, exc.hint) from None
    except OSError as exc:
        if section != "data":
            raise
        raise ScenarioError(
            "data.root",
            getattr(scenario.data, "root", None),
            f"a location fedlt can read the {scenario.data.dataset} data from",
            hint=f"Loading it failed: {type(exc).__name__}: {exc}.",
        ) from None


def _memory_error(scenario: Any, need: int, available: int) -> ScenarioError:
    d = scenario.data
    allowed = f"small enough for the data to fit in the {available / _GIB:.1f} GiB of memory available"
    if d.dataset == "synthetic":
        n = d.n_train + d.n_test
        return ScenarioError(
            "data.n_train",
            d.n_train,
            allowed,
            hint=f"data.n_train + data.n_test = {n} samples of data.shape {list(d.shape)} need about "
            f"{need / _GIB:.1f} GiB ({n} x {math.prod(d.shape)} values x 8 bytes: the arrays and their "
            "tensors); lower data.n_train, data.n_test or data.shape.",
        )
    return ScenarioError(
        "data.dataset",
        d.dataset,
        allowed,
        hint=f"Loading it takes about {need / _GIB:.1f} GiB; use a machine with more memory.",
    )


def check_data_feasible(scenario: Any) -> None:
    """Cheap checks that need no data loading (run by `fedlt validate` and before a run).

    More clients than the dataset's known training size, and data that cannot fit in the memory
    available now (:func:`fedlt.data.datasets.estimate_bytes` against :func:`available_memory`),
    are refused before anything is allocated.
    """
    d = scenario.data
    params = d.params()
    n = known_train_size(d.dataset, **params)
    if n is not None and scenario.partition.n_clients > n:
        raise ScenarioError(
            "partition.n_clients",
            scenario.partition.n_clients,
            f"at most the {n} training samples of {d.dataset}",
        )
    need = estimate_bytes(d.dataset, **params)
    available = available_memory() if need is not None else None
    if need is not None and available is not None and need > available:
        raise _memory_error(scenario, need, available)


def _task_count_error(n_tasks: int, clients: list[np.ndarray]) -> ScenarioError:
    sizes = np.array([len(c) for c in clients])
    smallest = int(np.flatnonzero(sizes == sizes[sizes > 0].min())[0])
    return ScenarioError(
        "stream.n_tasks",
        n_tasks,
        f"at most {sizes[smallest]}, the sample count of the smallest non-empty client",
        hint=f"Every task of a client's stream needs a sample, and client {smallest} has {sizes[smallest]}.",
    )


def build_federated_data(
    scenario: Any,
    device: torch.device | str = "cpu",
    check_raw: Callable[[RawDataset], None] | None = None,
) -> FederatedData:
    """Load, long-tail, partition and place the scenario's data; every draw seeded by the scenario.

    ``check_raw`` is called with the dataset as loaded, before anything else is built: where
    checks that need the samples' shape (does the model fit?) run, without this layer knowing
    about models (:func:`fedlt.prepare.build_data` passes the model check).

    Raises
    ------
    ScenarioError
        Anything about the scenario that only the data or the machine can tell (see the module
        docstring), before any tensor is built.
    """
    check_data_feasible(scenario)
    seed, lt, part, st = scenario.seed, scenario.long_tail, scenario.partition, scenario.stream
    if st.kind != "none" and st.seed is not None:  # what clients read has its own seed (stream.seed)
        seed = st.seed
    with _boundary(scenario, "data"):
        raw: RawDataset = load_dataset(scenario.data.dataset, seed=seed, **scenario.data.params())
    with _boundary(scenario, "eval"):  # before anything is built: held-out classes reach no client
        raw, x_ood, ood = _ood_set(scenario.eval.ood, raw, seed)
    if check_raw is not None:
        with _boundary(scenario, "model"):
            check_raw(raw)
    available = class_counts(raw.train.y, raw.num_classes)
    counts = long_tail_counts(available, lt.profile, **lt.params())
    keep = subsample_long_tail(raw.train.y, counts, numpy_rng(seed, "long-tail"))
    y_lt = raw.train.y[keep]
    if part.n_clients > len(keep):
        raise ScenarioError(
            "partition.n_clients",
            part.n_clients,
            f"at most the {len(keep)} training samples left after the long-tail profile",
        )
    with _boundary(scenario, "partition"):
        clients = partition(
            part.kind,
            y_lt,
            part.n_clients,
            numpy_rng(seed, "partition"),
            num_classes=raw.num_classes,
            **part.params(),
        )
    per_client = client_class_counts(y_lt, clients, raw.num_classes)
    views = local_test_views(
        per_client, raw.test.y, [numpy_rng(seed, "test-view", k) for k in range(part.n_clients)]
    )
    streams = schedule = settings = None
    if st.kind != "none":
        try:
            check_task_count(st.n_tasks, [len(idx) for idx in clients])
        except ValueError:
            raise _task_count_error(st.n_tasks, clients) from None
        if st.schedule == "shared":
            schedule = shared_schedule(
                raw.num_classes, st.kind, st.n_tasks, st.disjoint_percent, numpy_rng(seed, "schedule")
            )
        streams = [
            build_stream(
                idx,
                y_lt,
                st.kind,
                st.n_tasks,
                st.disjoint_percent,
                st.blurry_percent,
                numpy_rng(seed, "stream", k),
                schedule=schedule,
            )
            for k, idx in enumerate(clients)
        ]
        settings = st.model_dump(mode="json")
    y_clean, noise = y_lt, None
    if scenario.noise.kind != "none":  # after the views and streams: they follow the clean classes
        y_lt, noise = _noisy_labels(scenario, y_clean, clients, raw.num_classes, seed)
        per_client = client_class_counts(y_lt, clients, raw.num_classes)
    device = torch.device(device)
    return FederatedData(
        name=raw.name,
        num_classes=raw.num_classes,
        class_names=raw.class_names,
        input_shape=tuple(raw.input_shape),
        x_train=to_tensor(raw, raw.train, keep).to(device),
        y_train=torch.as_tensor(y_lt, dtype=torch.long, device=device),
        x_test=to_tensor(raw, raw.test).to(device),
        y_test=torch.as_tensor(raw.test.y, dtype=torch.long, device=device),
        train_class_counts=class_counts(y_clean, raw.num_classes),  # the long tail as built (clean)
        client_indices=clients,
        client_counts=per_client,
        test_views=views,
        streams=streams,
        schedule=schedule,
        stream_settings=settings,
        y_train_clean=None if noise is None else torch.as_tensor(y_clean, dtype=torch.long, device=device),
        noise=noise,
        x_ood=None if x_ood is None else x_ood.to(device),
        ood=ood,
    )


def _ood_set(
    spec: Any, raw: RawDataset, seed: int
) -> tuple[RawDataset, torch.Tensor | None, dict[str, Any] | None]:
    """The dataset the run trains and tests on, the OOD inputs and their description
    (``[eval.ood]``, :mod:`fedlt.data.ood`)."""
    if spec.kind == "none":
        return raw, None, None
    if spec.kind == "held-out-classes":
        inside, held, class_ids = hold_out_classes(raw, spec.classes)
        info = {"held_out": sorted(spec.classes), "class_ids": class_ids.tolist()}
        x_ood = to_tensor(raw, raw.test, held)
    else:
        inside, info = raw, {"dataset": spec.dataset}
        x_ood = ood_dataset_tensor(raw, spec.dataset, spec.params or {}, seed)
    return inside, x_ood, {"kind": spec.kind, "n_ood": int(x_ood.shape[0]), **info}


def with_client_samples(
    data: FederatedData, added: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> FederatedData:
    """``data`` with each client's added samples (``client -> (x, y)``) appended to the training set
    and to that client's indices (``data_client_samples``, docs/plugins.md).

    Appended in client order after the real samples, so the real ones keep their indices. The
    clients' class counts grow by what they got; the global counts (the long tail as built, from
    which shot groups come) and the local test views stay those of the real data. With
    ``[noise]`` an added sample's clean label is its label. Returns ``data`` itself when nothing
    is added.
    """
    added = {k: v for k, v in sorted(added.items()) if v[1].numel()}
    if not added:
        return data
    device, n = data.x_train.device, data.y_train.numel()
    xs, ys, indices = [data.x_train], [data.y_train], list(data.client_indices)
    counts = data.client_counts.copy()
    for k, (x, y) in added.items():
        m = y.numel()
        xs.append(x.to(device=device, dtype=data.x_train.dtype))
        ys.append(y.to(device=device, dtype=torch.long))
        indices[k] = np.concatenate([indices[k], np.arange(n, n + m, dtype=np.int64)])
        counts[k] += np.bincount(y.cpu().numpy(), minlength=data.num_classes)
        n += m
    new_y = torch.cat(ys[1:])
    clean = data.y_train_clean
    return dataclasses.replace(
        data,
        x_train=torch.cat(xs),
        y_train=torch.cat(ys),
        client_indices=indices,
        client_counts=counts,
        y_train_clean=None if clean is None else torch.cat([clean, new_y]),
    )


def _noisy_labels(
    scenario: Any, clean: np.ndarray, clients: list[np.ndarray], num_classes: int, data_seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """The clients' noisy training labels and the noise's summary (``[noise]``, docs/noise.md)."""
    nz = scenario.noise
    with _boundary(scenario, "noise"):
        mapping = resolve_map(nz.map, num_classes)
        rates = class_rates(nz.kind, nz.rate, nz.rates, class_counts(clean, num_classes), mapping)
    t = transition_matrix(nz.kind, rates, mapping)
    seed = nz.seed if nz.seed is not None else data_seed
    noisy = apply_noise(clean, clients, t, seed)
    per_client = noisy_class_counts(clean, noisy, clients, num_classes)
    summary = noise_summary(nz.model_dump(mode="json") | {"seed": seed}, rates, t, per_client, len(clean))
    return noisy, {**summary, "per_client": per_client}
