"""``manet-explain``: attention-map figures, stability and sparsity of trained models.

    manet-explain maps CKPT [--data SPEC] [--n 8] [--out DIR] [--methods attention cam gradcam]
                      [--per-sheet 16]
    manet-explain stability CKPT CKPT ... [--data SPEC] [--n 64] [--out DIR] [--method auto]
    manet-explain sparsity CKPT [--data SPEC] [--n 64] [--out DIR]

Checkpoints are the ``best.pt`` / ``last.pt`` files ``manet-train`` writes; the images
are the first ``--n`` test images of the checkpoint's dataset (``--data`` overrides it),
at the checkpoint's image size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

_EPILOG = """\
examples:
  manet-explain maps runs/manet20/best.pt --n 8
  manet-explain stability runs/seed*/best.pt --n 200 --out runs/stability
  manet-explain sparsity runs/r50_brnpa/best.pt --data /data/cub --n 500
"""

# Keys every checkpoint from manet-train carries that the explain tools read.
REQUIRED_KEYS = ("model", "arch", "num_classes")


class UsageError(Exception):
    """A bad argument or input file: reported as ``manet-explain: error: ...``."""


def warn(text: str) -> None:
    """A one-line warning on stderr (stdout carries only the JSON summary)."""
    print(f"manet-explain: warning: {text}", file=sys.stderr, flush=True)


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def json_text(obj: Any) -> str:
    """Strict JSON (``NaN``/``Infinity`` are not JSON): non-finite numbers become null,
    with a warning naming where they were."""
    found: list[str] = []

    def clean(v, where):
        if isinstance(v, float) and not math.isfinite(v):
            found.append(where)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v
    out = clean(obj, "")
    if found:
        warn(f"non-finite values written as null: {', '.join(found[:5])}"
             + (f" and {len(found) - 5} more" if len(found) > 5 else ""))
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from manet_kernels.explain.overlay import METHODS, ROWS_PER_SHEET
    from manet_kernels.explain.stability import STABILITY_METHODS

    p = argparse.ArgumentParser(
        prog="manet-explain", description="Explain trained manet_kernels models: attention-map "
        "figures, attention stability across trainings (MANet §5.3.1), BR-NPA sparsity.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{maps,stability,sparsity}")

    def common(sp: argparse.ArgumentParser, n: int, out_help: str) -> None:
        sp.add_argument("--data", default=None, help="dataset spec (default: the checkpoint's): "
                        "'digits', 'cifar10:PATH', 'cifar100:PATH' or an image-folder path")
        sp.add_argument("--n", type=int, default=n, help=f"number of test images (default {n})")
        sp.add_argument("--out", default=None, help=out_help)
        sp.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        sp.add_argument("--kernels", choices=("fused", "reference"), default="fused",
                        help="attention modules to rebuild the model with (default fused)")
        sp.add_argument("--backend", default="auto", help="kernel backend (default auto)")
        sp.add_argument("--batch-size", type=int, default=64, help="images per forward")

    m = sub.add_parser("maps", help="figure of attention maps / CAM / Grad-CAM on test images",
                       description="PNG sheets: a row per image with the input and the "
                       "overlays of each method that applies to the model, colour bars under "
                       "the heat maps (attention: its raw sigmoid value, 0..1; CAM / Grad-CAM: "
                       "min..max of each image).")
    m.add_argument("checkpoint")
    common(m, 8, "output folder (default: <checkpoint folder>/explain)")
    m.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="methods to draw (default: every one the model supports); asking for "
                   "one the model lacks is an error")
    m.add_argument("--prefix", default="", help="file-name prefix")
    m.add_argument("--per-sheet", type=int, default=ROWS_PER_SHEET, metavar="K",
                   help=f"images per PNG (default {ROWS_PER_SHEET}); more images are written as "
                   "numbered sheets attention_maps_01.png, _02, ...")

    s = sub.add_parser("stability", help="IoU of thresholded maps against the most accurate "
                       "model (MANet §5.3.1)",
                       description="Maps of several trainings of one architecture, scaled to "
                       "0..255 and thresholded at >= THRESHOLD, compared by IoU with the most "
                       "accurate model's (by the checkpoints' test_acc, else accuracy on the "
                       "images). Writes stability.json and stability.png.")
    s.add_argument("checkpoints", nargs="+")
    common(s, 64, "output folder (default: <first checkpoint's folder>/explain)")
    s.add_argument("--method", choices=STABILITY_METHODS, default="auto",
                   help="auto: the model's own attention map, else Grad-CAM (default)")
    s.add_argument("--threshold", type=int, default=127, help="on the 0..255 scale (127)")

    z = sub.add_parser("sparsity", help="BR-NPA sparsity (max/mean of the norm-weighted "
                       "average part map)", description="Mean BR-NPA sparsity over test images, "
                       "printed as JSON (and written to OUT/sparsity.json with --out).")
    z.add_argument("checkpoint")
    common(z, 64, "folder for sparsity.json (default: print only)")
    return p


def read_checkpoint_meta(path: str, *, verify: bool = False) -> dict[str, Any]:
    """The checkpoint dict with its keys checked, one clear line for a missing, empty,
    truncated, corrupted or foreign file. Without ``verify`` the tensors stay memory-mapped
    and the checksum is not computed (a cheap look at the metadata; :func:`load` verifies)."""
    from manet_kernels.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path, map_location="cpu", required=REQUIRED_KEYS,
                               verify=verify, mmap=not verify)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except ValueError as e:  # CheckpointError: the message names the file and the fault
        raise UsageError(str(e)) from None


def load(path: str, args) -> tuple[torch.nn.Module, dict]:
    from manet_kernels.checkpoint import build_model

    ckpt = read_checkpoint_meta(path, verify=True)
    try:
        model = build_model(ckpt, kernels=args.kernels, backend=args.backend)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {path}: the model could not be rebuilt: {e}") from e
    return model.to(args.device), ckpt


def dataset_images(ckpt: dict, args):
    """The first ``args.n`` test images of the checkpoint's (or ``--data``'s) dataset."""
    from manet_kernels.data import load_dataset

    spec = args.data if args.data is not None else ckpt.get("data")
    try:
        info = load_dataset(spec, image_size=ckpt.get("image_size"), train=False)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"data {spec!r}: {e}") from e
    in_ch = ckpt.get("in_channels")
    if in_ch is not None and int(in_ch) != info.in_channels:
        raise UsageError(f"data {spec!r} has {info.in_channels}-channel images but the model "
                         f"takes {in_ch} channels")
    n = min(args.n, len(info.test))
    if n == 0:
        raise UsageError(f"data {spec!r} has no test images")
    if n < args.n:
        print(f"manet-explain: note: --n {args.n} asks for more than the {n} test images of "
              f"{spec!r}: using all {n}", file=sys.stderr, flush=True)
    items = [info.test[i] for i in range(n)]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items])
    return images, labels, info


def _check_common(args) -> None:
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")


def _out_dir(args, first_checkpoint: str) -> Path:
    return Path(args.out) if args.out is not None else Path(first_checkpoint).parent / "explain"


def cmd_maps(args) -> dict:
    from manet_kernels.explain.cam import attention_maps_of, explain_forward, has_cam, has_grad_cam
    from manet_kernels.explain.overlay import METHODS, save_attention_maps

    if args.per_sheet < 1:
        raise UsageError(f"--per-sheet must be at least 1, got {args.per_sheet}")
    model, ckpt = load(args.checkpoint, args)
    images, labels, info = dataset_images(ckpt, args)
    if args.methods is not None:
        probe = explain_forward(model, images[:1].to(args.device), need_features=False)
        supported = {"attention": attention_maps_of(probe.output) is not None,
                     "cam": has_cam(model), "gradcam": has_grad_cam(model)}
        lacking = [m for m in args.methods if not supported[m]]
        if lacking:
            raise UsageError(f"{ckpt['arch']} has no maps for method(s) {lacking} "
                             f"(it supports {[m for m in METHODS if supported[m]]})")
    methods = tuple(args.methods) if args.methods is not None else METHODS
    paths = save_attention_maps(model, images, _out_dir(args, args.checkpoint),
                                mean=info.mean, std=info.std, labels=labels,
                                class_names=info.classes, methods=methods, prefix=args.prefix,
                                rows_per_sheet=args.per_sheet)
    return {"arch": ckpt["arch"], "images": len(images), "files": [str(p) for p in paths]}


def cmd_stability(args) -> dict:
    from manet_kernels.explain.stability import evaluate_stability, plot_stability

    if args.threshold < 0 or args.threshold > 255:
        raise UsageError(f"--threshold must be in 0..255, got {args.threshold}")
    metas = [read_checkpoint_meta(p) for p in args.checkpoints]
    specs = {(m.get("data"), m.get("image_size")) for m in metas}
    if args.data is None and len(specs) > 1:
        raise UsageError(f"the checkpoints were trained on different data {sorted(map(str, specs))}"
                         ": pass --data")
    images, labels, _ = dataset_images(metas[0], args)
    del metas
    result = evaluate_stability(args.checkpoints, images, labels, method=args.method,
                                device=args.device, threshold=args.threshold,
                                batch_size=args.batch_size, loader=lambda p: load(p, args))
    out = _out_dir(args, args.checkpoints[0])
    out.mkdir(parents=True, exist_ok=True)
    summary = result.to_dict()
    (out / "stability.json").write_text(json_text(summary))
    plot = plot_stability(result, out / "stability.png")
    return {"reference": summary["reference_name"], "method": result.method,
            "mean_iou": dict(zip(result.names, summary["mean_iou"])),
            "mean_iou_others": summary["mean_iou_others"],
            "files": [str(out / "stability.json"), str(plot)]}


def cmd_sparsity(args) -> dict:
    from manet_kernels.explain.brnpa import model_sparsity

    model, ckpt = load(args.checkpoint, args)
    images, _, _ = dataset_images(ckpt, args)
    s = model_sparsity(model, images, batch_size=args.batch_size).double()
    bad = int((~torch.isfinite(s)).sum())
    if bad:  # e.g. a diverged training: NaN features give NaN maps
        warn(f"sparsity is not finite for {bad} of {len(s)} images (NaN/inf in the model's "
             "part maps or features): those values, the mean and the std are null")
    result = {"checkpoint": str(args.checkpoint), "arch": ckpt["arch"], "images": len(images),
              "mean_sparsity": finite_or_none(float(s.mean())),
              "std_sparsity": finite_or_none(float(s.std())) if len(s) > 1 else 0.0,
              "sparsity": [finite_or_none(float(v)) for v in s]}
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sparsity.json").write_text(json_text(result))
        result["files"] = [str(out / "sparsity.json")]
    return result


COMMANDS = {"maps": cmd_maps, "stability": cmd_stability, "sparsity": cmd_sparsity}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_common(args)
        summary = COMMANDS[args.command](args)
    except UsageError as e:
        parser.error(str(e))  # 'manet-explain: error: ...', exit status 2
    except ValueError as e:  # the explain functions' input checks
        parser.error(str(e))
    if args.command == "sparsity":
        summary = {k: v for k, v in summary.items() if k != "sparsity"}
    print(json_text(summary), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
