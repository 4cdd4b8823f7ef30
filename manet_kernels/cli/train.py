"""manet-train: train the ResNet family with attention on digits, CIFAR or image folders.

Single process (``manet-train ...`` / ``python -m manet_kernels.train ...``) or
distributed under ``torchrun`` (detected from ``RANK``/``WORLD_SIZE``). Every epoch
writes ``<out>/last.pt`` (and ``best.pt``), a row of ``<out>/log.csv`` and TensorBoard
scalars; the end writes ``<out>/summary.json`` and attention-map figures in
``<out>/maps/``. ``--resume`` continues bit for bit: the data order and the
augmentation of every epoch are functions of (seed, epoch), and the checkpoint holds
every random-number state; a resumed run keeps its checkpoint's schedule. A NaN or
infinite training loss stops the run (exit status 1) naming the epoch and step.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import json
import math
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from manet_kernels.data import TRAIN_EXTRA
from manet_kernels.models.registry import TIMM_PREFIX
from manet_kernels.ops._common import BACKENDS, ENV_BACKEND, resolve_backend

# Recipe defaults per kind of data; the command line overrides each one.
# digits, threads=1: its 16x16 convolutions gain little from a second thread, and on
# 2 shared cores a second OpenMP thread made steps 3-10x slower (83-137 ms/step with
# one thread, 270-1018 ms with two; MANet-ResNet20, batch 32, load average 2-3).
RECIPES = {
    "digits": dict(epochs=10, batch_size=32, image_size=16, schedule="cosine", workers=0,
                   threads=1),
    "cifar": dict(epochs=160, batch_size=128, image_size=32, schedule="step", workers=4,
                  threads=None),
    "folder": dict(epochs=90, batch_size=256, image_size=224, schedule="step", workers=8,
                   threads=None),
}

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
              "images_per_s", "seconds"]

# Printed as written (RawDescriptionHelpFormatter), so the flag lines stay whole.
_EPILOG = """\
recipe defaults (each overridable):
  digits (the default --data; sklearn's bundled 8x8 digits, offline):
      --epochs {d[epochs]} --batch-size {d[batch_size]} --image-size {d[image_size]} --schedule {d[schedule]} --threads {d[threads]}
      (random shifts of up to 1/8 of the side)
  cifar10:PATH / cifar100:PATH (python-pickle release):
      --epochs {c[epochs]} --batch-size {c[batch_size]} --image-size {c[image_size]} --schedule {c[schedule]}
      (random crop with 4-pixel padding + horizontal flip)
  image folder PATH (train/ and val/ or test/ of class folders):
      --epochs {f[epochs]} --batch-size {f[batch_size]} --image-size {f[image_size]} --schedule {f[schedule]}
      (random resized crop + flip; test: resize + centre crop)
  always: SGD momentum 0.9, --lr 0.1, --wd 1e-4; step = x0.1 at 50% and 75% of
  the epochs; ABN/MANet loss = CE(attention branch) + CE(perception branch);
  *_brnpa models: --warmup-epochs 1 (else 0).

resume: --epochs, --batch-size, --schedule and --warmup-epochs default to the
  checkpoint's and must match it; a finished run resumed with the same or fewer
  --epochs reports itself finished (its summary.json as it was).

distributed: torchrun --nproc_per_node N -m manet_kernels.train ...
  (NCCL on GPU, gloo on CPU; --batch-size is per process)
""".format(d=RECIPES["digits"], c=RECIPES["cifar"], f=RECIPES["folder"])  # noqa: E501


# The arguments that define a run's learning-rate schedule. On resume they default to
# the checkpoint's, and another value is refused: the epochs already trained followed
# the checkpoint's schedule, so no other schedule continues them exactly.
SCHEDULE_ARGS = ("epochs", "batch_size", "schedule", "warmup_epochs")

# With --amp fp16 a step whose loss overflowed is skipped by the grad scaler (the weights
# stay as they were), like any overflow; this many in a row means the forward pass
# itself overflows in fp16, which no loss scale can fix.
MAX_SKIPPED_IN_A_ROW = 20


# BR-NPA heads without channel attention (resnet20_brnpa, aw_resnet20_brnpa) diverge in
# the first epoch at the full rate on digits (loss ~3, above chance) and end at 91-92 %
# (seed 0); with one warm-up epoch 98.6 % / 99.2 %. SE/CBAM variants: 99-100 % without.
BRNPA_WARMUP_EPOCHS = 1.0


class UsageError(Exception):
    """A bad argument or input: reported as 'manet-train: error: ...', exit status 2."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: reported with its epoch and step, exit
    status 1, and no summary (the epoch it happened in is not saved either)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="manet-train", description=__doc__.split("\n\n")[0],
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arch", default="manet_resnet20",
      help="model name for manet_kernels.models.create (default: manet_resnet20), or "
           "timm:<name> for a timm model, converted to the fused kernels")
    a("--timm-args", default=None, metavar="JSON",
      help="with --arch timm:<name>: timm.create_model keyword arguments as a JSON object, "
           "e.g. '{\"block_args\": {\"attn_layer\": \"cbam\"}}'")
    a("--data", default=None,
      help="'digits' (default), 'cifar10:PATH', 'cifar100:PATH', a folder holding "
           "cifar-10-batches-py/cifar-100-python, or an image-folder tree")
    a("--image-size", type=int, default=None, help="input side (default: per data, below)")
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="per process")
    a("--lr", type=float, default=0.1)
    a("--wd", type=float, default=1e-4, help="weight decay")
    a("--momentum", type=float, default=0.9)
    a("--schedule", choices=["step", "cosine"], default=None)
    a("--warmup-epochs", type=float, default=None,
      help="linear learning-rate warm-up (default: 1 for *_brnpa models, else 0)")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=None, help="data-loading processes per process")
    a("--out", default=None, help="output folder (default: runs/<arch>)")
    a("--kernels", choices=["fused", "reference"], default="fused",
      help="attention modules: the fused kernels or the pure-PyTorch reference")
    a("--backend", choices=BACKENDS, default="auto",
      help="kernel backend for the fused modules (default: auto)")
    a("--amp", choices=["none", "bf16", "fp16"], default="none",
      help="autocast dtype (fp16 needs a GPU; bf16 also runs on CPU)")
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", default=None, metavar="CKPT|auto",
      help="continue from a checkpoint, on its schedule; 'auto' = <out>/last.pt if it "
           "exists")
    a("--teacher", default=None, metavar="CKPT",
      help="distil from this checkpoint: loss = alpha*CE + (1-alpha)*T^2*KL(teacher||student)")
    a("--alpha", type=float, default=0.5, help="weight of the label loss with --teacher")
    a("--temperature", type=float, default=1.0, help="softmax temperature with --teacher")
    a("--sync-bn", action="store_true", help="SyncBatchNorm when distributed")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: 1 for digits, else torch's default)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--explain-images", type=int, default=8,
      help="test images to render attention maps for at the end (0: none)")
    a("--n-parts", type=int, default=None, help="model option: BR-NPA parts")
    a("--reduced-strides", action="store_true", default=None,
      help="model option: last stage stride 1 (BR-NPA models)")
    # For tests: train/evaluate on the first N images; report and sleep after each step.
    a("--limit-train", type=int, default=None, help=argparse.SUPPRESS)
    a("--limit-test", type=int, default=None, help=argparse.SUPPRESS)
    a("--debug-step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------ small parts

def _data_kind(data: str | None) -> str:
    from manet_kernels.data import _parse

    kind, _ = _parse(data)
    return {"cifar10": "cifar", "cifar100": "cifar"}.get(kind, kind)


def _check_args(args) -> None:
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size,
                "--image-size": args.image_size, "--threads": args.threads,
                "--n-parts": args.n_parts, "--limit-train": args.limit_train,
                "--limit-test": args.limit_test}
    for name, v in positive.items():
        if v is not None and v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.explain_images < 0:
        raise UsageError(f"--explain-images must be >= 0, got {args.explain_images}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (args.wd >= 0 and math.isfinite(args.wd)):
        raise UsageError(f"--wd must be >= 0, got {args.wd}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise UsageError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")


def _resolve_defaults(args) -> str:
    """Fill what the command line left out from the data's recipe; returns the data kind."""
    try:
        kind = _data_kind(args.data)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from e
    for key, value in RECIPES[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_epochs is None:
        args.warmup_epochs = BRNPA_WARMUP_EPOCHS if args.arch.endswith("_brnpa") else 0.0
    return kind


def _require(module: str, package: str, what: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{what} needs {package} ({e}): {TRAIN_EXTRA}") from e


def _check_dependencies(args, kind: str) -> None:
    """The optional packages this run cannot do without, checked before any training."""
    if kind == "digits":
        _require("sklearn", "scikit-learn", "--data digits (the default)")
    elif kind == "folder":
        _require("PIL", "pillow", f"--data {args.data} (an image folder)")
    if args.explain_images:
        _require("PIL", "pillow",
                 f"--explain-images {args.explain_images} (attention maps; 0 skips them)")
    if _is_timm(args):
        try:
            importlib.import_module("manet_kernels.models.from_timm")
        except ImportError as e:
            raise UsageError(f"--arch {args.arch} needs the timm package: {e}") from e


def _check_backend(args, device: torch.device) -> None:
    """--backend against the device before training: the fused modules would only
    fail inside the first training step."""
    if args.kernels == "reference":
        return  # the reference modules run anywhere and ignore the backend
    backend, name = args.backend, f"--backend {args.backend}"
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto")
        name = f"${ENV_BACKEND}={backend}"
        if backend not in BACKENDS:
            raise UsageError(f"${ENV_BACKEND} must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and device.type != backend:
        possible = backend == "cpu" or torch.cuda.is_available()
        why = f"this run is on {device}" if possible else "no CUDA device is available"
        fix = "use --backend auto" if args.backend != "auto" else f"unset ${ENV_BACKEND}"
        raise UsageError(f"{name} needs a {backend.upper()} device, but {why} ({fix}"
                         + (f", or --device {backend})" if possible else ")"))
    try:
        # Mixed attention's kernel stands for the compiled library: every op is built
        # into it for the same devices.
        resolve_backend(backend, device, "mixed_attention_apply")
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"{name}: {e}") from e


def _adopt_schedule(args, ckpt: dict, path: Path) -> bool:
    """On resume: the schedule arguments left out come from the checkpoint, others must
    match it. Returns whether the checkpoint's run is finished; such a run may be
    resumed with the same or fewer --epochs, and then only reports itself finished."""
    saved = ckpt.get("args") or {}
    done = int(ckpt["epoch"])
    planned = int(saved.get("epochs", args.epochs or done))
    finished = done >= planned
    for key in SCHEDULE_ARGS:
        given = getattr(args, key)
        if key not in saved or given is None:
            setattr(args, key, saved.get(key, given))
        elif given != saved[key] and not (key == "epochs" and finished and given <= planned):
            flag = "--" + key.replace("_", "-")
            state = (f"is finished ({planned} epochs)" if finished else
                     f"stopped after epoch {done} of {planned}")
            raise UsageError(f"--resume {path}: {flag} {given} differs from the checkpoint's "
                             f"{flag} {saved[key]} (its run {state}); a resumed run keeps "
                             f"its schedule: leave {flag} out, or start a new run")
    if finished:
        args.epochs = planned
    return finished


def _is_timm(args) -> bool:
    return args.arch.startswith(TIMM_PREFIX)


def _timm_args(args) -> dict | None:
    """--timm-args parsed (None when not given)."""
    if args.timm_args is None:
        return None
    if not _is_timm(args):
        raise UsageError(f"--timm-args needs --arch {TIMM_PREFIX}<name>, not --arch {args.arch}")
    try:
        value = json.loads(args.timm_args)
    except ValueError as e:
        raise UsageError(f"--timm-args is not valid JSON ({e}): {args.timm_args!r}") from e
    if not isinstance(value, dict):
        raise UsageError(f"--timm-args must be a JSON object of timm.create_model keyword "
                         f"arguments, got {args.timm_args!r}")
    return value


def _model_options(args) -> dict:
    opts = {}
    timm_args = _timm_args(args)
    if timm_args is not None:
        opts["timm_args"] = timm_args
    if args.n_parts is not None:
        opts["n_parts"] = args.n_parts
    if args.reduced_strides:
        opts["reduced_strides"] = True
    return opts


class _Dist:
    """The process-group facts the loop needs (world size 1 without torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1 and "RANK" in os.environ

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        return t

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _pick_device(args, dist: _Dist) -> torch.device:
    if args.device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist.enabled else
                                torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
        if dist.enabled and dev.index is None:
            dev = torch.device("cuda", dist.local_rank)
    elif dev.type != "cpu":
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    return dev


def _lr_factor(args, steps_per_epoch: int):
    total = args.epochs * steps_per_epoch
    warm = int(round(args.warmup_epochs * steps_per_epoch))
    milestones = (args.epochs // 2, (3 * args.epochs) // 4)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if args.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in milestones if m > 0)

    return factor


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["epoch"]) <= upto_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v: float) -> str:
    return repr(float(v))


def _tensorboard(out: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tb"))
    except Exception as e:  # tensorboard missing or broken: logging it is optional
        hint = f"; {TRAIN_EXTRA}" if isinstance(e, ImportError) else ""
        warnings.warn(f"TensorBoard logging disabled ({type(e).__name__}: {e}{hint})",
                      stacklevel=2)
        return None


def _want_progress(args, dist: _Dist) -> bool:
    if not dist.main or args.no_progress or not sys.stderr.isatty():
        return False
    if importlib.util.find_spec("tqdm") is None:  # the bar is optional: train without it
        warnings.warn(f"no progress bar: tqdm is not installed ({TRAIN_EXTRA})", stacklevel=2)
        return False
    return True


def _loader(dataset, sampler, batch_size, workers, device, drop_last):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=drop_last,
        persistent_workers=False)  # workers are re-made each epoch: they see set_epoch


class _Strided(torch.utils.data.Sampler):
    """Indices rank, rank + world, ...: each test image exactly once across processes."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


# ---------------------------------------------------------------------------- training

def _loss(output, target, teacher_logits, args):
    from manet_kernels.models import classification_loss, logits_of

    loss = classification_loss(output, target)
    if teacher_logits is None:
        return loss
    t = args.temperature
    student = F.log_softmax(logits_of(output).float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)
    return args.alpha * loss + (1.0 - args.alpha) * kl


def _autocast(args, device):
    if args.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _prepare(x, device, channels_last):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _LossWatch:
    """Stops an epoch whose training loss is NaN or infinite, naming the first such step.

    Without a grad scaler any non-finite loss stops the run. The flag stays on the
    device and is read every step on CPU, every 10 steps on a GPU (a read waits for
    the device), and at the end of the epoch on all processes together (one process
    stopping alone would leave the others waiting). With the fp16 scaler, a step it
    skips (non-finite gradients, which a non-finite loss gives) is normal and leaves
    the weights as they were; MAX_SKIPPED_IN_A_ROW skips in a row, or a whole epoch of
    them, stop the run. Skips agree across processes: the gradients are all-reduced.
    """

    def __init__(self, epoch: int, steps: int, device: torch.device, dist: _Dist):
        self.epoch, self.steps, self.dist = epoch, steps, dist
        self.first = torch.full((), steps, dtype=torch.int64, device=device)  # steps: none
        self.every = 10 if device.type == "cuda" else 1
        self.skipped = self.in_a_row = 0

    def after_step(self, step: int, finite: torch.Tensor, stepped: bool) -> None:
        if not stepped:
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
                self._fail(step, f"overflowed: the fp16 grad scaler skipped "
                                 f"{self.in_a_row} steps in a row (try --amp bf16)")
            return
        self.in_a_row = 0
        self.first = torch.minimum(self.first, torch.where(finite, self.steps, step))
        if not self.dist.enabled and (step + 1) % self.every == 0:
            self._check()

    def end(self) -> None:
        self._check(self.dist.all_reduce(self.first, "MIN"))
        if self.skipped == self.steps:
            self._fail(self.steps - 1, "overflowed: the fp16 grad scaler skipped every "
                                       "step of the epoch (try --amp bf16)")

    def _check(self, first: torch.Tensor | None = None) -> None:
        step = int(self.first if first is None else first)
        if step < self.steps:
            self._fail(step, "is not finite (NaN or Inf)")

    def _fail(self, step: int, what: str):
        raise TrainingDiverged(
            f"epoch {self.epoch + 1} step {step + 1} of {self.steps}: the training loss "
            f"{what}; stopped without saving epoch {self.epoch + 1} (a lower --lr or "
            "--warmup-epochs may help)")


def _optimizer_step(loss, optimizer, scheduler, scaler) -> bool:
    """Backward and optimizer step; False where the fp16 grad scaler skipped the step
    (it found non-finite gradients, and lowered its scale)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return before is None or scaler.get_scale() >= before


def _progress_bar(loader, args, epoch, progress):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                dynamic_ncols=True, file=sys.stderr)


def _train_epoch(model, teacher, loader, optimizer, scheduler, scaler, args, device, dist,
                 epoch, progress):
    """One epoch; returns (mean loss, accuracy, images/s, seconds, steps skipped by the
    fp16 grad scaler). Raises TrainingDiverged on a non-finite loss."""
    from manet_kernels.models import logits_of

    model.train()
    # loss*n over finite losses, correct, n, n of the finite losses
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    watch = _LossWatch(epoch, len(loader), device, dist)
    bar = _progress_bar(loader, args, epoch, progress)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x = _prepare(x, device, args.channels_last)
        y = y.to(device, non_blocking=True)
        t_logits = None
        if teacher is not None:
            with torch.no_grad(), _autocast(args, device):
                t_logits = logits_of(teacher(x))
        with _autocast(args, device):
            output = model(x)
            loss = _loss(output, y, t_logits, args)
        stepped = _optimizer_step(loss, optimizer, scheduler, scaler)
        with torch.no_grad():
            n = torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)
            finite = torch.isfinite(loss.detach())
            correct = (logits_of(output).argmax(1) == y).sum()
            sums += torch.stack([torch.where(finite, loss.detach().double() * n, 0.0),
                                 correct.double(), n, torch.where(finite, n, 0.0)])
        watch.after_step(step, finite, stepped)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == len(loader) - 1:
                s = sums.tolist()
                rate = s[2] * dist.world / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{s[0] / max(s[3], 1):.4f}",
                                acc=f"{100 * s[1] / s[2]:.2f}%", img_s=f"{rate:.0f}")
        if args.debug_step_sleep:
            # Tests kill the run at a known point: they wait for this line.
            print(f"debug: epoch {epoch + 1} step {step + 1} done", flush=True)
            time.sleep(args.debug_step_sleep)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    watch.end()
    dist.all_reduce(sums)
    loss_sum, correct, n, n_loss = sums.tolist()
    return (loss_sum / max(n_loss, 1), correct / max(n, 1), n / max(seconds, 1e-9), seconds,
            watch.skipped)


@torch.no_grad()
def _evaluate(model, loader, args, device, dist):
    from manet_kernels.models import classification_loss, logits_of

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x = _prepare(x, device, args.channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(args, device):
            output = model(x)
            loss = classification_loss(output, y)
        n = y.shape[0]
        sums += torch.stack([loss.double() * n,
                             (logits_of(output).argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(sums)
    loss_sum, correct, n = sums.tolist()
    return loss_sum / max(n, 1), correct / max(n, 1)


def _needs_find_unused(model, x, device) -> bool:
    """Whether some parameter gets no gradient (DDP must then look for unused ones)."""
    from manet_kernels.models import classification_loss

    was_training = model.training
    model.eval()  # eval: a probe must not move the BatchNorm running statistics
    try:
        y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        classification_loss(model(x.to(device)), y).backward()
        unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return unused


def _report_conversion(model, args) -> None:
    """Which timm modules create() converted (convert() again: it is idempotent)."""
    from manet_kernels.models import convert

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="convert: ")
        report = convert(model, args.kernels, args.backend, summary=True)
    kinds = sorted({c.rsplit(".", 1)[-1] for _, c in report.converted})
    print(f"manet-train: {args.arch}: {len(report.converted)} module(s) on the "
          f"{args.kernels} kernels" + (f" ({', '.join(kinds)})" if kinds else ""), flush=True)
    for name, kind, why in report.skipped:
        print(f"manet-train: {args.arch}: {name} ({kind}) left as timm's: {why}", flush=True)


def _explain(raw_model, info, test_set, args, device, out: Path) -> list:
    n = min(args.explain_images, len(test_set))
    if n == 0:
        return []
    methods = {}
    if _is_timm(args):  # logits only: Grad-CAM on the last feature map
        if not hasattr(raw_model, "cam_layer"):
            warnings.warn(f"explanation maps skipped: {args.arch} has no timm feature_info "
                          "to take a Grad-CAM layer from", stacklevel=2)
            return []
        methods = {"methods": ("gradcam",)}
    try:
        from manet_kernels.explain import save_attention_maps
    except ImportError as e:
        warnings.warn(f"attention maps skipped: {e}", stacklevel=2)
        return []
    items = [test_set[i] for i in range(n)]
    images = torch.stack([x for x, _ in items]).to(device)
    labels = [int(y) for _, y in items]
    raw_model.eval()
    paths = save_attention_maps(raw_model, images, out / "maps", mean=info.mean, std=info.std,
                                labels=labels, class_names=info.classes, **methods)
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------- resuming

def _resume_path(args, out: Path) -> Path | None:
    if args.resume == "auto":
        return out / "last.pt" if (out / "last.pt").is_file() else None
    if args.resume is None:
        return None
    path = Path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume: checkpoint {path} does not exist")
    return path


def _load_resume(path: Path, args, options: dict) -> dict:
    from manet_kernels.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--resume: {e}") from e
    missing = [k for k in ("optimizer", "scheduler", "rng", "epoch") if k not in ckpt]
    if missing:
        raise UsageError(f"--resume {path}: not a training checkpoint "
                         f"(lacks {', '.join(missing)})")
    if ckpt["arch"] != args.arch:
        raise UsageError(f"--resume {path}: trained as {ckpt['arch']}, not --arch {args.arch}")
    saved = (ckpt.get("model_options") or {}).get("timm_args")
    if _is_timm(args) and saved != options.get("timm_args"):
        raise UsageError(f"--resume {path}: trained with --timm-args "
                         f"{json.dumps(saved)}, not {json.dumps(options.get('timm_args'))}")
    return ckpt


def _restore(ckpt: dict, path: Path, raw_model, optimizer, scheduler, scaler,
             steps_per_epoch: int) -> None:
    """Model, optimizer, schedule, scaler and random states from a training checkpoint."""
    from manet_kernels.checkpoint import strip_prefix

    # The scheduler counts steps: with another number of steps per epoch the schedule
    # would continue at the wrong point.
    done = int(ckpt["epoch"])
    steps = ckpt["scheduler"].get("last_epoch")
    if isinstance(steps, int) and steps != done * steps_per_epoch:
        raise UsageError(f"--resume {path}: its run took {steps // max(done, 1)} steps per "
                         f"epoch, this one {steps_per_epoch} (the data, --batch-size or the "
                         "number of processes differ)")
    raw_model.load_state_dict(strip_prefix(ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])


def _finished_summary(out: Path, resume_path: Path, epochs: int, dist: _Dist) -> dict | None:
    """The summary.json a finished run wrote, when it is resumed from its own folder:
    reported as it is (None when there is none to trust; the caller then rebuilds it)."""
    path = out / "summary.json"
    if resume_path.resolve() != (out / "last.pt").resolve() or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("epochs") != epochs or summary.get("final_test_acc") is None:
        return None
    if dist.main:
        print(f"{resume_path}: finished all {epochs} epochs, nothing to train; its "
              f"summary ({path}):\n{json.dumps(summary, indent=2)}", flush=True)
    return summary


# -------------------------------------------------------------------------------- main

def run(args) -> dict:
    """Train as ``args`` say; returns the summary dict (on every rank)."""
    from manet_kernels.checkpoint import load_model, save_checkpoint
    from manet_kernels.data import load_dataset
    from manet_kernels.models import create

    wall_start = time.perf_counter()
    _check_args(args)
    options = _model_options(args)
    if args.out is None:
        args.out = str(Path("runs") / args.arch.replace(":", "_"))
    out = Path(args.out)
    resume_path = _resume_path(args, out)
    ckpt = None if resume_path is None else _load_resume(resume_path, args, options)
    finished = ckpt is not None and _adopt_schedule(args, ckpt, resume_path)
    kind = _resolve_defaults(args)
    dist = _Dist()
    device = _pick_device(args, dist)
    if args.sync_bn and dist.enabled and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only)")
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    _check_backend(args, device)
    if finished:
        kept = _finished_summary(out, resume_path, args.epochs, dist)
        if kept is not None:
            return kept
    _check_dependencies(args, kind)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if dist.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)

    try:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        try:
            info = load_dataset(args.data, image_size=args.image_size, seed=args.seed)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--data: {e}") from e
        train_set, test_set = info.train, info.test
        augmented = train_set
        if args.limit_train is not None:
            train_set = torch.utils.data.Subset(train_set, range(min(args.limit_train,
                                                                     len(train_set))))
        if args.limit_test is not None:
            test_set = torch.utils.data.Subset(test_set, range(min(args.limit_test,
                                                                   len(test_set))))

        try:
            with warnings.catch_warnings():  # timm: _report_conversion says what convert did
                warnings.filterwarnings("ignore", message="convert: ")
                raw_model = create(args.arch, num_classes=info.num_classes,
                                   in_channels=info.in_channels, kernels=args.kernels,
                                   backend=args.backend, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--arch {args.arch}: {e}") from e
        if _is_timm(args) and dist.main:
            _report_conversion(raw_model, args)
        raw_model.to(device)
        if args.channels_last:
            raw_model.to(memory_format=torch.channels_last)

        teacher = None
        if args.teacher is not None:
            try:
                teacher, tckpt = load_model(args.teacher, kernels=args.kernels,
                                            backend=args.backend, map_location=device)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"--teacher: {e}") from e
            if int(tckpt["num_classes"]) != info.num_classes:
                raise UsageError(f"--teacher {args.teacher}: {tckpt['num_classes']} classes, "
                                 f"the data has {info.num_classes}")
            for p in teacher.parameters():
                p.requires_grad_(False)

        sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed)
        per_rank = len(sampler)
        # A last batch of one sample would break training-mode BatchNorm.
        drop_last = per_rank % args.batch_size == 1 and per_rank > 1
        train_loader = _loader(train_set, sampler, args.batch_size, args.workers, device,
                               drop_last)
        test_loader = _loader(test_set, _Strided(len(test_set), dist.rank, dist.world),
                              args.batch_size, args.workers, device, False)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise UsageError(f"--batch-size {args.batch_size}: no full batch in "
                             f"{per_rank} training images")

        model = raw_model
        if dist.enabled:
            if args.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                raw_model = model
            probe = torch.stack([train_set[i][0] for i in range(min(2, len(train_set)))])
            find_unused = _needs_find_unused(model, probe, device)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused)
        elif args.sync_bn:
            warnings.warn("--sync-bn has no effect without torchrun", stacklevel=2)
        if args.compile:
            model = torch.compile(model)

        optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr,
                                    momentum=args.momentum, weight_decay=args.wd)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      _lr_factor(args, steps_per_epoch))
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

        start_epoch, best_acc, rows = 0, None, []
        if ckpt is not None:
            _restore(ckpt, resume_path, raw_model, optimizer, scheduler, scaler,
                     steps_per_epoch)
            start_epoch, best_acc = int(ckpt["epoch"]), ckpt.get("best_acc")
            rows = _read_log(out / "log.csv", start_epoch)
            if dist.main:
                print(f"{resume_path}: finished all {args.epochs} epochs, nothing to train"
                      if finished else f"resumed from {resume_path} at epoch {start_epoch}",
                      flush=True)

        progress = _want_progress(args, dist)
        writer = None
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            if not finished:  # a summary of an earlier run must not outlive this one
                (out / "summary.json").unlink(missing_ok=True)
            writer = _tensorboard(out)
            print(f"manet-train: {args.arch} ({args.kernels} kernels) on {info.name} "
                  f"{info.image_size}x{info.image_size}, {len(train_set)} train / "
                  f"{len(test_set)} test images, {args.epochs} epochs, batch "
                  f"{args.batch_size} x {dist.world}, device {device}", flush=True)

        throughput, test_acc, test_loss = [], None, None
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            augmented.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            train_loss, train_acc, img_s, _, skipped = _train_epoch(
                model, teacher, train_loader, optimizer, scheduler, scaler, args, device,
                dist, epoch, progress)
            test_loss, test_acc = _evaluate(model, test_loader, args, device, dist)
            seconds = time.perf_counter() - epoch_start
            throughput.append(img_s)
            improved = best_acc is None or test_acc > best_acc
            best_acc = test_acc if improved else best_acc
            if dist.main:
                row = {"epoch": epoch + 1, "lr": _fmt(lr), "train_loss": _fmt(train_loss),
                       "train_acc": _fmt(train_acc), "test_loss": _fmt(test_loss),
                       "test_acc": _fmt(test_acc), "images_per_s": f"{img_s:.1f}",
                       "seconds": f"{seconds:.2f}"}
                rows.append(row)
                _write_log(out / "log.csv", rows)
                if writer is not None:
                    for k in ("lr", "train_loss", "train_acc", "test_loss", "test_acc",
                              "images_per_s"):
                        writer.add_scalar(k, float(row[k]), epoch + 1)
                    writer.flush()
                print(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  train loss "
                      f"{train_loss:.4f} acc {100 * train_acc:.2f}%  test loss "
                      f"{test_loss:.4f} acc {100 * test_acc:.2f}%  {img_s:.0f} img/s  "
                      f"{seconds:.1f} s" + (f"  ({skipped} steps skipped by the fp16 grad "
                                            "scaler)" if skipped else ""), flush=True)
                ckpt = {
                    "model": raw_model.state_dict(), "arch": args.arch,
                    "num_classes": info.num_classes, "in_channels": info.in_channels,
                    "model_options": options, "data": args.data,
                    "image_size": info.image_size, "epoch": epoch + 1,
                    "test_acc": float(test_acc), "best_acc": float(best_acc),
                    "mean": list(info.mean), "std": list(info.std),
                    "classes": list(info.classes),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": _rng_state(),
                    "data_order": {"seed": args.seed, "next_epoch": epoch + 1},
                    "args": _plain(vars(args)),
                }
                save_checkpoint(ckpt, out / "last.pt")
                if improved:
                    save_checkpoint(ckpt, out / "best.pt")
            dist.barrier()

        if writer is not None:
            writer.close()
        if finished:  # nothing trained: the checkpoint holds the last epoch's accuracy
            test_acc = ckpt.get("test_acc")

        summary = {
            "arch": args.arch, "kernels": args.kernels, "backend": args.backend,
            "data": info.name, "image_size": info.image_size,
            "train_images": len(train_set), "test_images": len(test_set),
            "epochs": args.epochs, "batch_size": args.batch_size, "world_size": dist.world,
            "amp": args.amp, "best_test_acc": best_acc, "final_test_acc": test_acc,
            "images_per_s": float(np.mean(throughput)) if throughput else None,
            "peak_memory_bytes": _peak_memory(device),
            "wall_time_s": None, "torch": torch.__version__, "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "threads": torch.get_num_threads(), "maps": [],
        }
        if dist.main:
            summary["maps"] = _explain(raw_model, info, test_set, args, device, out)
            summary["wall_time_s"] = time.perf_counter() - wall_start
            tmp = out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, out / "summary.json")
            print(json.dumps(summary, indent=2), flush=True)
        return summary
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        parser.error(str(e))  # prints 'manet-train: error: ...' and exits with status 2
    except TrainingDiverged as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
