"""Errors raised by the dataset loaders."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk where the loader expects them (downloads are disabled)."""


def not_found_message(name: str, root: str, expected: str) -> str:
    """One-line message for a dataset whose files are missing under ``root``.

    ``expected`` is an example path of the torchvision layout (e.g. ``root/cifar-10-batches-py``).
    """
    return (
        f"dataset '{name}' not found under '{root}' (expected the torchvision layout, e.g. {expected}); "
        "downloads are disabled, place the files there first"
    )
