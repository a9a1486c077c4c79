"""A grid of triggered example images, like Figure 5 of the ABD paper (Hong et al., ICML 2023).

One row per sample image, one column per trigger (optionally a first "clean" column); the
trigger's name above its column and an optional caption under it (the paper puts the
poisoned teacher's Acc/ASR there).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from abd_fl.attacks.triggers import Trigger

__all__ = ["save_trigger_figure"]


def _to_display(image: torch.Tensor):
    """(C, H, W) in [0, 1] -> a numpy array imshow understands ((H, W) or (H, W, 3))."""
    arr = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    if arr.shape[0] == 1:
        return arr[0].numpy()
    if arr.shape[0] == 3:
        return arr.permute(1, 2, 0).numpy()
    return arr.mean(dim=0).numpy()  # any other channel count: show the channel mean


def save_trigger_figure(
    path: str | Path,
    images: torch.Tensor,
    triggers: Mapping[str, "Trigger"],
    captions: Mapping[str, str] | None = None,
    *,
    include_clean: bool = True,
    cell_inches: float = 1.3,
    dpi: int = 120,
) -> Path:
    """Write one PNG grid of every trigger's :meth:`~abd_fl.attacks.Trigger.apply` on ``images``.

    ``images``: (N, C, H, W) in [0, 1], one row each. ``triggers``: column title -> trigger
    (all built for ``images``' shape), in the given order. ``captions``: optional column
    title -> text written under the column (e.g. ``"93.8/100"`` for a teacher's Acc/ASR);
    titles without a caption get none. ``include_clean`` adds a first column with the
    untouched images. Images are drawn with nearest-neighbour upscaling (8x8 digits stay
    crisp), grayscale with a fixed [0, 1] range. Returns the path written.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if not triggers and not include_clean:
        raise ValueError("nothing to draw: no triggers and include_clean=False")
    captions = dict(captions or {})
    unknown = sorted(set(captions) - set(triggers) - ({"clean"} if include_clean else set()))
    if unknown:
        raise ValueError(f"captions for unknown columns: {', '.join(unknown)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns: list[tuple[str, torch.Tensor]] = []
    if include_clean:
        columns.append(("clean", images))
    for title, trigger in triggers.items():
        columns.append((title, trigger.apply(images)))

    n_rows, n_cols = int(images.shape[0]), len(columns)
    caption_space = 0.3 if captions else 0.0
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.3 + caption_space),
        squeeze=False,
    )
    for col, (title, batch) in enumerate(columns):
        for row in range(n_rows):
            ax = axes[row][col]
            shown = _to_display(batch[row])
            if shown.ndim == 2:
                ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if row == n_rows - 1 and title in captions:
                ax.set_xlabel(captions[title], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
