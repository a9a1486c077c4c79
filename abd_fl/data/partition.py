"""Split sample indices across federated clients with Flower Datasets' partitioners.

``iid``: :class:`flwr_datasets.partitioner.IidPartitioner`. That partitioner cuts the dataset
into contiguous shards, so the indices are shuffled (with ``seed``) first; partition sizes then
differ by at most one and each is a uniform random sample.

``dirichlet``: :class:`flwr_datasets.partitioner.DirichletPartitioner` with label skew
controlled by ``alpha`` (smaller = more skewed) and ``self_balancing=True``: a client that already
holds more than the average number of samples gets no further classes. This is the balancing of
the reference implementation of the Dirichlet scheme (Yurochkin et al., 2019) that the popular
NIID-Bench splits use; it keeps partition sizes from collapsing, so ``min_partition_size`` can be
met even for small sets such as digits at small ``alpha``.

Both run on an in-memory ``datasets.Dataset`` built from the labels: nothing is downloaded or cached.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

PARTITION_SCHEMES = ("iid", "dirichlet")


def partition_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Return, for each of ``num_partitions`` clients, the int64 indices of its samples.

    The partitions are disjoint and together cover ``range(len(labels))``; the result depends
    only on the arguments (same seed, same split). ``alpha`` and ``min_partition_size`` are used
    by the ``dirichlet`` scheme only.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    label_array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    n = label_array.shape[0]
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme '{scheme}'; choose one of: {', '.join(PARTITION_SCHEMES)}")
    is_int = isinstance(num_partitions, (int, np.integer)) and not isinstance(num_partitions, bool)
    if not is_int or not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be an integer between 1 and the number of samples ({n}), got {num_partitions!r}"
        )
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
        if min_partition_size < 0:
            raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size!r}")
        if num_partitions * min_partition_size > n:
            raise ValueError(
                f"cannot give {num_partitions} partitions at least {min_partition_size} samples each "
                f"from {n} samples; lower num_partitions or min_partition_size"
            )

    order = np.arange(n, dtype=np.int64)
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(n).astype(np.int64)
        partitioner = IidPartitioner(num_partitions=int(num_partitions))
    else:
        partitioner = DirichletPartitioner(
            num_partitions=int(num_partitions),
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=int(min_partition_size),
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = Dataset.from_dict({"idx": order, "label": label_array[order].astype(np.int64)})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its per-retry warnings; a final failure is reported below
            return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions)]
    except ValueError as err:
        if scheme != "dirichlet":
            raise
        raise ValueError(
            f"dirichlet partitioning could not give each of {num_partitions} partitions at least "
            f"{min_partition_size} samples from {n} samples with alpha={alpha} after 11 tries; "
            "raise alpha, or lower num_partitions or min_partition_size"
        ) from err
