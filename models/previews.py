"""PNG previews: the middle slice of each volume in three planes, image and label side by side.

Volumes are (D, H, W) arrays in RAS order (axis 0 left->right, 1 posterior->anterior, 2
inferior->superior), as fedsynth's data loading and the sampler produce them. Uses matplotlib's
object API with the Agg canvas (no global pyplot state, no display needed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLANES = ("sagittal", "coronal", "axial")


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three middle slices of a (D, H, W) RAS volume, superior/anterior up for display."""
    volume = np.asarray(volume)
    d, h, w = volume.shape
    sagittal = volume[d // 2, :, :]      # (A, S)
    coronal = volume[:, h // 2, :]       # (R, S)
    axial = volume[:, :, w // 2]         # (R, A)
    return [np.flipud(s.T) for s in (sagittal, coronal, axial)]


def save_preview(path: Path | str, images: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray | None] | None = None,
                 titles: Sequence[str] | None = None, num_classes: int | None = None) -> Path:
    """One row per volume: its three mid-slices, then (when given) the label map's three mid-slices.

    images: (D, H, W) intensities, shown on [0, 1]; labels: (D, H, W) integer classes or None.
    Written atomically.
    """
    path = Path(path)
    labels = list(labels) if labels is not None else [None] * len(images)
    has_labels = any(label is not None for label in labels)
    columns = 6 if has_labels else 3
    if num_classes is None and has_labels:
        num_classes = int(max(np.max(label) for label in labels if label is not None)) + 1
    figure = Figure(figsize=(1.6 * columns, 1.7 * len(images)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(images), columns, squeeze=False)
    for row, (image, label) in enumerate(zip(images, labels)):
        panels = [(s, "gray", 0.0, 1.0) for s in mid_slices(image)]
        if has_labels:
            label_slices = mid_slices(label) if label is not None else [None] * 3
            panels += [(s, "viridis", 0, max(1, (num_classes or 2) - 1)) for s in label_slices]
        for column, (plane, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[row, column]
            ax.set_axis_off()
            if plane is not None:
                ax.imshow(plane, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            if row == 0:
                kind = "image" if column < 3 else "label"
                ax.set_title(f"{kind} {PLANES[column % 3]}", fontsize=7)
        if titles is not None:
            axes[row, 0].text(-0.1, 0.5, titles[row], transform=axes[row, 0].transAxes, fontsize=7,
                              rotation=90, ha="right", va="center")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
