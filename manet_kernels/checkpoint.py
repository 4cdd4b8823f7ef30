"""Checkpoints: atomic saving, and rebuilding a trained model from one.

A checkpoint is a dict of plain types and tensors (loadable with
``torch.load(path, weights_only=True)``): ``model`` (state_dict without a ``module.``
prefix), ``arch``, ``num_classes``, ``in_channels``, ``model_options``, ``data``,
``image_size``, ``epoch`` (epochs completed), ``test_acc``, and, from the trainer,
``optimizer``, ``scheduler``, ``scaler``, ``rng`` and ``args``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "strip_prefix"]


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the
    file then replaces ``path`` in one ``os.replace``: a crash at any point leaves
    either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable only once the directory entry is on disk.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict (``weights_only=True``: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be loaded: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise ValueError(f"checkpoint {path}: expected a dict with 'model' and 'arch' keys "
                         "(written by manet-train)")
    return ckpt


def strip_prefix(state_dict: dict) -> dict:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for k, v in state_dict.items():
        while True:
            if k.startswith("module."):
                k = k[len("module."):]
            elif k.startswith("_orig_mod."):
                k = k[len("_orig_mod."):]
            else:
                break
        out[k] = v
    return out


def load_model(path: str | os.PathLike, *, kernels: str = "fused", backend: str = "auto",
               map_location: Any = "cpu"):
    """Rebuild the model a checkpoint was trained as, load its weights, eval mode.

    Returns ``(model, checkpoint_dict)``; ``kernels``/``backend`` choose the attention
    modules (the weights load either way).
    """
    from manet_kernels.models import create

    ckpt = load_checkpoint(path, map_location=map_location)
    options = dict(ckpt.get("model_options") or {})
    model = create(ckpt["arch"], num_classes=int(ckpt["num_classes"]),
                   in_channels=int(ckpt.get("in_channels", 3)), kernels=kernels,
                   backend=backend, **options)
    model.load_state_dict(strip_prefix(ckpt["model"]))
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, ckpt
