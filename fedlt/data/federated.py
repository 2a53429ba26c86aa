"""The data as a run uses it: long-tailed training set, client index arrays, local test views.

Built once per run from the scenario, deterministically from its seed. Tensors live on the
run's device; clients hold index arrays into them, never copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlt.data.datasets import RawDataset, known_train_size, load_dataset, to_tensor
from fedlt.data.longtail import long_tail_counts, subsample_long_tail
from fedlt.data.partition import partition
from fedlt.data.stream import ClientStream, build_stream
from fedlt.data.views import class_counts, client_class_counts, local_test_views
from fedlt.errors import ScenarioError
from fedlt.seeding import numpy_rng

__all__ = ["FederatedData", "build_federated_data", "check_data_feasible"]


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

    def describe(self) -> dict[str, Any]:
        """What `fedlt inspect --json` prints: counts after the long tail, per client, views."""
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_class_counts": self.train_class_counts.tolist(),
            "n_train": int(self.train_class_counts.sum()),
            "n_test": int(self.y_test.numel()),
            "clients": [
                {
                    "id": k,
                    "n_samples": int(self.client_counts[k].sum()),
                    "class_counts": self.client_counts[k].tolist(),
                    "test_view_size": len(self.test_views[k]),
                    **({"tasks": self.streams[k].describe()} if self.streams is not None else {}),
                }
                for k in range(self.n_clients)
            ],
        }


def _load(scenario: Any) -> RawDataset:
    d = scenario.data
    return load_dataset(
        d.dataset,
        root=d.root,
        download=d.download,
        seed=scenario.seed,
        test_fraction=d.test_fraction,
        cache_dir=d.cache_dir,
        n_train=d.n_train,
        n_test=d.n_test,
        num_classes=d.num_classes,
        shape=tuple(d.shape),
        separation=d.separation,
        image_size=d.image_size,
    )


def check_data_feasible(scenario: Any) -> None:
    """Cheap checks that need no data loading (run by `fedlt validate` and before a run)."""
    d = scenario.data
    n = known_train_size(
        d.dataset, root=d.root, seed=scenario.seed, test_fraction=d.test_fraction, n_train=d.n_train
    )
    if n is not None and scenario.partition.n_clients > n:
        raise ScenarioError(
            "partition.n_clients",
            scenario.partition.n_clients,
            f"at most the {n} training samples of {d.dataset}",
        )
    if d.dataset in ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder") and not d.root:
        raise ScenarioError(
            "data.root",
            d.root,
            f"a local folder for {d.dataset}",
            hint="Point data.root at a copy (and set data.download = true to let torchvision fetch it).",
        )


def build_federated_data(scenario: Any, device: torch.device | str = "cpu") -> FederatedData:
    """Load, long-tail, partition and place the scenario's data; every draw seeded by the scenario."""
    check_data_feasible(scenario)
    raw = _load(scenario)
    seed, lt, part = scenario.seed, scenario.long_tail, scenario.partition
    available = class_counts(raw.train.y, raw.num_classes)
    counts = long_tail_counts(available, lt.profile, lt.imbalance_factor, lt.n_max, lt.fraction_minority)
    keep = subsample_long_tail(raw.train.y, counts, numpy_rng(seed, "long-tail"))
    y_lt = raw.train.y[keep]
    if part.n_clients > len(keep):
        raise ScenarioError(
            "partition.n_clients",
            part.n_clients,
            f"at most the {len(keep)} training samples left after the long-tail profile",
        )
    clients = partition(
        part.kind,
        y_lt,
        part.n_clients,
        numpy_rng(seed, "partition"),
        alpha=part.alpha,
        min_client_size=part.min_client_size,
        shards_per_client=part.shards_per_client,
        num_classes=raw.num_classes,
    )
    per_client = client_class_counts(y_lt, clients, raw.num_classes)
    views = local_test_views(
        per_client, raw.test.y, [numpy_rng(seed, "test-view", k) for k in range(part.n_clients)]
    )
    streams = None
    st = scenario.stream
    if st.kind != "none":
        streams = [
            build_stream(
                idx,
                y_lt,
                st.kind,
                st.n_tasks,
                st.disjoint_percent,
                st.blurry_percent,
                numpy_rng(seed, "stream", k),
            )
            for k, idx in enumerate(clients)
        ]
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
        train_class_counts=class_counts(y_lt, raw.num_classes),
        client_indices=clients,
        client_counts=per_client,
        test_views=views,
        streams=streams,
    )
