"""Benchmark one training step of the attention ResNets: fused kernels against the
reference modules, and every variant against the plain ResNet of the same depth.

    python benchmarks/bench_train_step.py --device cpu --quick
    python benchmarks/bench_train_step.py --device cuda --out /tmp/bench

One step = forward, the model's loss (``manet_kernels.models.classification_loss``:
CE, or CE(attention) + CE(perception) for ABN/MANet), backward and an SGD step with
momentum and weight decay, in train mode. GPU: batch 64 at 224x224, bf16 autocast,
channels_last (issue 5's configuration). CPU: a small configuration that fits a
2-core machine. Images/s and peak memory per row; ``vs_plain`` is the plain
ResNet's step time over this row's (fused plain row = the same model either way),
``vs_reference`` the reference flavour's over the fused one, both measured in this
run. Rows are appended to benchmarks/results/train_step.csv, except by --quick
(smoke) and --no-save runs.

timm rows (``--timm resnet18``, the default when timm is installed; ``--timm`` alone:
none): ``timm:<name>`` (timm's plain ResNet, the ``vs_plain`` base of the timm rows) and
``timm:<name>+cbam`` (``block_args=dict(attn_layer="cbam")``), ``kernels=fused`` being
the model after ``manet_kernels.convert`` and ``reference`` timm's own modules.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

try:
    import manet_kernels  # noqa: E402,F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(1, bu.ROOT)
from manet_kernels import models  # noqa: E402

OP = "train_step"
KERNELS = ("fused", "reference")
# ImageNet's 1000 classes for the ImageNet nets, CIFAR's 10 for the CIFAR ones (an
# ABN attention branch carries a K-channel map: 1000 would dominate a CIFAR net).
GPU_CONFIG = dict(depth=50, batch=64, size=224, dtype="bfloat16", channels_last=True,
                  classes=1000)
CPU_CONFIG = dict(depth=20, batch=64, size=32, dtype="float32", channels_last=False,
                  classes=10)
QUICK = {"cpu": dict(depth=20, batch=8, size=16, dtype="float32", channels_last=False,
                     classes=10),
         "cuda": dict(depth=18, batch=16, size=64, dtype="bfloat16", channels_last=True,
                      classes=1000)}
VARIANTS = ("", "se_", "cbam_", "abn_", "manet_", "aw_", "aw_se_", "aw_cbam_")

COLUMNS = ("op", "arch", "kernels", "batch", "image_size", "classes", "amp", "channels_last", "ms",
           "images_per_s", "peak_mem_mb", "vs_plain", "vs_reference") + bu.META_COLUMNS
TABLE = (("arch", "arch", ""), ("kernels", "kernels", ""), ("ms", "ms/step", ".2f"),
         ("images_per_s", "img/s", ".1f"), ("peak_mem_mb", "peak MB", ".0f"),
         ("vs_plain", "plain/this", ".3f"), ("vs_reference", "ref/fused", ".2f"))


TIMM_PREFIX = "timm:"


def build(arch: str, kernels: str, num_classes: int):
    """``models.create(arch)``; ``timm:<name>[+<attn>]``: timm's model with
    ``block_args=dict(attn_layer=<attn>)``, converted for ``kernels="fused"``."""
    if not arch.startswith(TIMM_PREFIX):
        return models.create(arch, num_classes, kernels=kernels)
    name, _, attn = arch[len(TIMM_PREFIX):].partition("+")
    timm_args = {"block_args": {"attn_layer": attn}} if attn else {}
    return models.create(TIMM_PREFIX + name, num_classes, kernels=kernels,
                         timm_args=timm_args)


def make_step(arch: str, kernels: str, cfg: dict, device: torch.device, num_classes: int):
    """A closure running one training step; it holds the model and optimizer, so
    dropping it frees them."""
    torch.manual_seed(0)
    model = build(arch, kernels, num_classes).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (cfg["batch"],), device=device)
    dtype = bu.parse_dtype(cfg["dtype"])
    amp = dtype != torch.float32

    def step():
        ctx = torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()
        with ctx:
            loss = models.classification_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def _measure(arch, kernels, cfg, device, quick, sink) -> tuple[float, float] | None:
    """(median ms, peak MB) of one training step, or None (noted) if it fails."""
    try:
        step = make_step(arch, kernels, cfg, device, cfg["classes"])
        step()  # warm-up (and the check that it runs at all)
        return bu.time_ms(step, device, quick=quick), bu.peak_memory_mb(step, device)
    except Exception as e:  # noqa: BLE001 (reported, not fatal)
        sink.note(f"skip {arch} {kernels}: {bu.short_error(e)}")
        return None
    finally:
        step = None  # the last reference to the model, freed below
        bu.free_memory(device)


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    cfg = dict(QUICK[device.type] if args.quick else
               GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)
    for key in ("depth", "batch", "size"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if args.dtype:
        cfg["dtype"] = args.dtype
    if args.num_classes:
        cfg["classes"] = args.num_classes
    if args.channels_last is not None:
        cfg["channels_last"] = args.channels_last == "on"
    archs = [f"{v}resnet{cfg['depth']}" for v in args.variants]
    known = set(models.list_models())
    bad = [a for a in archs if a not in known]
    if bad:
        print(f"error: no model named {bad} (see manet_kernels.models.list_models())",
              file=sys.stderr)
        return 2
    timm_names = _timm_names(args.timm)
    if isinstance(timm_names, str):
        print(f"error: {timm_names}", file=sys.stderr)
        return 2
    # (arch, the plain model its vs_plain compares with)
    jobs = [(a, f"resnet{cfg['depth']}") for a in archs]
    for name in timm_names:
        jobs += [(f"{TIMM_PREFIX}{name}", f"{TIMM_PREFIX}{name}"),
                 (f"{TIMM_PREFIX}{name}+cbam", f"{TIMM_PREFIX}{name}")]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bu.environment(device)
    print(f"{OP} on {env['device_name']} | torch {env['torch']} | commit {env['commit']} | "
          f"{env['date_utc']} | batch {cfg['batch']} at {cfg['size']}x{cfg['size']}, "
          f"{cfg['dtype']}, channels_last={cfg['channels_last']}")
    sink = bu.Sink(OP, COLUMNS, args,
                   {"op": OP, "env": env, "config": cfg, "args": vars(args)})
    busy = bu.busy_note(device)
    if busy:
        sink.note(busy)
    times: dict[tuple[str, str], float] = {}
    # The reference flavour first, so each fused row has its vs_reference when written.
    flavours = sorted(args.kernels, key=lambda k: k != "reference")
    started = time.monotonic()
    for (arch, plain), kernels in [(j, k) for j in jobs for k in flavours]:
        if kernels == "reference" and arch == plain and "fused" in args.kernels:
            continue  # no attention module: the same model either way
        if bu.budget_spent(args.time_budget, started, sink.note, f"{arch} {kernels}"):
            break
        measured = _measure(arch, kernels, cfg, device, args.quick, sink)
        if measured is None:
            continue
        ms, mem = measured
        times[(arch, kernels)] = ms
        base = times.get((plain, "fused"), times.get((plain, kernels)))
        ref = times.get((arch, "reference"))
        row = {
            "op": OP, "arch": arch, "kernels": kernels, "batch": cfg["batch"],
            "image_size": cfg["size"], "classes": cfg["classes"], "amp": cfg["dtype"],
            "channels_last": cfg["channels_last"], "ms": ms,
            "images_per_s": cfg["batch"] / (ms * 1e-3), "peak_mem_mb": mem,
            "vs_plain": base / ms if base else math.nan,
            "vs_reference": ref / ms if ref and kernels == "fused" else math.nan,
            **env,
        }
        sink.emit(row, f"  {arch:>18} {kernels:>9}  {ms:9.2f} ms  "
                       f"{row['images_per_s']:8.1f} img/s")
    sink.finish(OP, sink.rows, TABLE)
    return 0


def _timm_names(names: list[str] | None) -> list[str] | str:
    """The timm models to benchmark (default: resnet18 when timm is installed), or the
    reason they cannot be."""
    if names is None:
        try:
            import timm  # noqa: F401
        except ImportError:
            return []
        return ["resnet18"]
    if not names:
        return []
    try:
        import timm
    except ImportError as e:
        return f"--timm needs the timm package ({e})"
    unknown = [n for n in names if not timm.is_model(n)]
    return f"unknown timm model(s) {unknown}" if unknown else list(names)


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS),
                    help="model prefixes ('' = plain ResNet), default: all; "
                         "--variants alone: none (timm rows only)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--depth", type=int, help="ResNet depth (GPU default 50, CPU 20)")
    ap.add_argument("--batch", type=int, help="batch size (default 64)")
    ap.add_argument("--size", type=int, help="image size (GPU default 224, CPU 32)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="autocast dtype (float32: no autocast; GPU default bfloat16)")
    ap.add_argument("--channels-last", choices=("on", "off"), default=None)
    ap.add_argument("--num-classes", type=int,
                    help="classes of the head (default 1000 on GPU, 10 on CPU)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timm", nargs="*", default=None, metavar="NAME",
                    help="timm ResNets to add, plain and with CBAM, converted (fused) vs "
                         "timm's own (reference); default: resnet18 when timm is "
                         "installed; --timm alone: none")
    bu.add_output_args(ap, OP, "rows")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
