"""Checkpoints: atomic saving with a checksum, verified loading, rebuilding a trained model.

A checkpoint is a dict of plain types and tensors (loadable with
``torch.load(path, weights_only=True)``): ``model`` (state_dict without a ``module.``
prefix), ``arch``, ``num_classes``, ``in_channels``, ``model_options``, ``data``,
``image_size``, ``epoch`` (epochs completed), ``test_acc``, and, from the trainer,
``optimizer``, ``scheduler``, ``scaler``, ``rng`` and ``args``.

:func:`save_checkpoint` adds ``checksum``: ``"sha256-v1:<hex>"``, a SHA-256 over every
other entry (each tensor's dtype, shape and bytes, and every plain value, in the dict's
order; see :func:`checksum`). It is computed from the loaded objects rather than the
file's bytes, so it lives inside the file it checks and does not depend on how
``torch.save`` lays out its zip archive. :func:`load_checkpoint` recomputes it and
refuses a mismatch; a checkpoint without one (older files, plain ``torch.save``) loads
with a warning.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import struct
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "CHECKSUM_KEY", "checksum", "save_checkpoint",
           "load_checkpoint", "build_model", "load_model", "strip_prefix"]

CHECKSUM_KEY = "checksum"
_SCHEME = "sha256-v1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_ZIP_END = b"PK\x05\x06"  # end-of-central-directory record, within the last 64 KiB + 22 B
_PICKLE_MAGIC = b"\x80"  # torch's legacy (pre-1.6) format starts with a pickle protocol byte


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupted, not a checkpoint."""


# --------------------------------------------------------------------------- checksum

def checksum(obj: Any) -> str:
    """``"sha256-v1:<hex>"`` of ``obj`` (the checkpoint dict without its ``checksum``).

    Deterministic for everything a ``weights_only`` load returns: tensors (dtype, shape,
    bytes; on any device), dicts in insertion order (pickle keeps it), lists, tuples,
    sets, numbers, strings, bytes, ``None``, ``torch.dtype`` / ``torch.device``. Every
    value is tagged and length-prefixed, so different structures cannot hash alike.
    """
    return f"{_SCHEME}:{_digest(obj, 'checkpoint').hex()}"


def _digest(obj: Any, where: str) -> bytes:
    h = hashlib.sha256()
    _feed(h, obj, where)
    return h.digest()


def _chunk(h, tag: bytes, data: bytes) -> None:
    h.update(tag + struct.pack("<Q", len(data)))
    h.update(data)


def _feed_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.is_conj() or t.is_neg():  # lazy flags: hash the values the tensor stands for
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    _chunk(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
    # A flat byte view of the values (any dtype, bf16 included); hashlib reads the
    # numpy buffer in place.
    _chunk(h, b"t", t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _feed(h, obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        _feed_tensor(h, obj)
    elif obj is None or isinstance(obj, bool):  # before int: bool is an int
        _chunk(h, b"B", repr(obj).encode())
    elif isinstance(obj, int):
        _chunk(h, b"I", str(obj).encode())
    elif isinstance(obj, float):
        _chunk(h, b"F", struct.pack("<d", obj))  # bit-exact, NaN and -0.0 included
    elif isinstance(obj, complex):
        _chunk(h, b"C", struct.pack("<dd", obj.real, obj.imag))
    elif isinstance(obj, str):
        _chunk(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        _chunk(h, b"Y", bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device)):
        _chunk(h, b"O", f"{type(obj).__name__}:{obj}".encode())
    elif isinstance(obj, dict):
        _chunk(h, b"D", str(len(obj)).encode())
        for k, v in obj.items():
            _feed(h, k, where)
            _feed(h, v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)) and all(type(v) is int for v in obj):
        # One chunk for a run of ints (the trainer's Python RNG state is 625 of them).
        _chunk(h, b"J" if isinstance(obj, list) else b"K", repr(list(obj)).encode())
    elif isinstance(obj, (list, tuple)):  # torch.Size too
        _chunk(h, b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif isinstance(obj, (set, frozenset)):  # no stable order: hash the sorted digests
        _chunk(h, b"E", b"".join(sorted(_digest(v, f"{where}{{}}") for v in obj)))
    else:
        raise TypeError(f"{where}: cannot checksum a {type(obj).__name__} (a checkpoint holds "
                        "tensors, plain numbers/strings and dicts/lists/tuples of them)")


# ------------------------------------------------------------------------------ saving

def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` the dict ``obj`` plus its ``checksum`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the
    file then replaces ``path`` in one ``os.replace``: a crash at any point leaves
    either the old file or the new one, never a torn one. ``obj`` is not modified.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save_checkpoint: obj must be a dict, got {type(obj).__name__}")
    payload = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = checksum(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- loading

def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    required: Sequence[str] = ("model", "arch"), verify: bool = True,
                    mmap: bool = False) -> dict:
    """Load a checkpoint dict (``weights_only=True``: no arbitrary code runs).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a
    ``ValueError``) with a one-line reason for anything else wrong: a directory, an empty,
    truncated, corrupted (checksum mismatch) or foreign file, or a dict that lacks a key
    of ``required``. ``verify=False`` skips the checksum (for a quick look at the
    metadata, with ``mmap=True`` to leave the tensors on disk). The returned dict has no
    ``checksum`` entry.
    """
    path = Path(path)
    ckpt = _torch_load(path, map_location, mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected "
                              "the dict manet-train writes")
    stored = ckpt.pop(CHECKSUM_KEY, None)
    if verify and stored is not None:
        _verify(path, ckpt, stored)
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the key(s) {missing} (expected a "
                              f"manet-train checkpoint with {list(required)})")
    if verify and stored is None:
        warnings.warn(f"checkpoint {path} has no checksum (written by plain torch.save or an "
                      "older manet_kernels): loaded without an integrity check", stacklevel=2)
    return ckpt


def _verify(path: Path, ckpt: dict, stored: Any) -> None:
    if not isinstance(stored, str) or not stored.startswith(f"{_SCHEME}:"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum entry is "
                              f"unreadable ({str(stored)[:40]!r})")
    try:
        actual = checksum(ckpt)
    except TypeError as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: {e}") from e
    if actual != stored:
        raise CheckpointError(f"checkpoint {path} is corrupted: checksum mismatch (stored "
                              f"{stored[:22]}..., contents hash to {actual[:22]}...)")


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``, every failure turned into one clear line."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") \
            from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file (0 bytes)")
    try:
        # mmap works for the zip format only; it keeps a metadata-only look cheap.
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and head.startswith(_ZIP_MAGIC))
    except Exception as e:  # noqa: BLE001  (torch raises anything from a bad file)
        raise CheckpointError(f"checkpoint {path} {_diagnose(path, head, size, e)}") from None


def _diagnose(path: Path, head: bytes, size: int, e: Exception) -> str:
    """Why ``torch.load`` failed, from the file's format and the error: never torch's
    advice to retry with ``weights_only=False``, which is wrong for a damaged file."""
    detail = _short(e)
    if "Unsupported global" in detail:
        return (f"is not a manet-train checkpoint: it holds objects a safe load refuses "
                f"({detail})")
    if head.startswith(_ZIP_MAGIC):
        if not _zip_end_intact(path, size):
            return f"is truncated ({size} bytes; the end of its zip archive is missing)"
        return f"is corrupted (a damaged torch zip archive: {detail})"
    if head.startswith(_PICKLE_MAGIC):
        if isinstance(e, EOFError):
            return f"is truncated ({size} bytes; a legacy torch file that ends early)"
        return f"is corrupted (a damaged legacy torch file: {detail})"
    text = _as_text(head)
    if text is not None:
        return f"is a text file, not a torch checkpoint (it starts {text[:24]!r})"
    return f"is not a torch checkpoint (unknown format, first bytes {head[:8].hex(' ')})"


def _short(e: Exception) -> str:
    """One line of torch's message that names the problem, without its advice."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    for tail in (". This is an internal miniz error", " was not an allowed global"):
        line = line.split(tail)[0]
    if "weights_only" in line:
        line = type(e).__name__
    return line[:160]


def _zip_end_intact(path: Path, size: int) -> bool:
    """Whether the zip's end record (22 bytes + its comment) is whole at the file's end:
    a file cut short loses it, or part of it, first."""
    start = max(0, size - (1 << 16) - 22)
    with open(path, "rb") as f:
        f.seek(start)
        tail = f.read()
    pos = tail.rfind(_ZIP_END)
    if pos < 0 or pos + 22 > len(tail):
        return False
    comment = struct.unpack("<H", tail[pos + 20:pos + 22])[0]
    return start + pos + 22 + comment <= size


def _as_text(head: bytes) -> str | None:
    """``head`` decoded if it reads as printable UTF-8 (a character cut off at the end is
    fine: the incremental decoder holds it back), else ``None``."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None


# ---------------------------------------------------------------------------- models

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


def build_model(ckpt: dict, *, kernels: str = "fused", backend: str = "auto",
                map_location: Any = "cpu"):
    """The model a loaded checkpoint dict was trained as, with its weights, eval mode."""
    from manet_kernels.models import create

    options = dict(ckpt.get("model_options") or {})
    model = create(ckpt["arch"], num_classes=int(ckpt["num_classes"]),
                   in_channels=int(ckpt.get("in_channels", 3)), kernels=kernels,
                   backend=backend, **options)
    model.load_state_dict(strip_prefix(ckpt["model"]))
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model


def load_model(path: str | os.PathLike, *, kernels: str = "fused", backend: str = "auto",
               map_location: Any = "cpu"):
    """Rebuild the model a checkpoint was trained as, load its weights, eval mode.

    Returns ``(model, checkpoint_dict)``; ``kernels``/``backend`` choose the attention
    modules (the weights load either way). The checkpoint is verified as by
    :func:`load_checkpoint`.
    """
    ckpt = load_checkpoint(path, map_location=map_location, required=("model", "arch",
                                                                      "num_classes"))
    model = build_model(ckpt, kernels=kernels, backend=backend, map_location=map_location)
    return model, ckpt
