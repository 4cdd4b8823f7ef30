"""manet-train: outputs, exact resume, atomic checkpoints, DDP (gloo), distillation, errors.

Runs are tiny (a few dozen digits at 16x16) and single-threaded (``--threads 1``), so
in-process and subprocess runs compute the same bits.
"""

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import manet_kernels.cli.train as train_cli
from manet_kernels.checkpoint import load_checkpoint, load_model, save_checkpoint
from manet_kernels.cli.train import (
    MAX_SKIPPED_IN_A_ROW,
    RECIPES,
    TrainingDiverged,
    _Dist,
    _loss,
    _LossWatch,
    _lr_factor,
    _optimizer_step,
    main,
)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--limit-train", "48", "--limit-test", "24", "--batch-size",
        "16", "--threads", "1", "--no-progress", "--seed", "3"]
# Columns that must match between runs (the others are timings).
EXACT = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _trained(tmp_path_factory, arch: str, epochs: int = 1) -> Path:
    out = tmp_path_factory.mktemp(arch)
    assert main(["--arch", arch, "--epochs", str(epochs), "--out", str(out),
                 "--explain-images", "0", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def resnet20_run(tmp_path_factory):
    """A finished 2-epoch run (do not resume it in place: tests share it)."""
    return _trained(tmp_path_factory, "resnet20", epochs=2)


def test_cli_writes_log_summary_checkpoints_and_maps(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--arch", "manet_resnet20", "--epochs", "2", "--out", str(out),
                 "--explain-images", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and '"best_test_acc"' in printed

    rows = _rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss",
                            "test_acc", "images_per_s", "seconds"}
    assert all(0 <= float(r["test_acc"]) <= 1 and float(r["images_per_s"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(0.1)  # cosine: full rate in epoch 1

    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "manet_resnet20" and summary["kernels"] == "fused"
    assert summary["epochs"] == 2 and summary["train_images"] == 48
    assert summary["test_images"] == 24 and summary["world_size"] == 1
    assert summary["final_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert summary["best_test_acc"] == pytest.approx(max(float(r["test_acc"]) for r in rows))
    assert summary["images_per_s"] > 0 and summary["peak_memory_bytes"] > 2 ** 20
    assert summary["wall_time_s"] > 0 and summary["torch"] == torch.__version__
    assert summary["device"] == "cpu"
    assert any((out / "tb").iterdir())

    # The maps: PNG files written by manet_kernels.explain.save_attention_maps.
    maps = [Path(p) for p in summary["maps"]]
    assert maps and all(p.is_file() and p.parent == out / "maps" for p in maps)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in maps)

    # Checkpoints: plain dicts loadable with weights_only=True, with the agreed keys.
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "arch", "num_classes", "in_channels", "model_options", "data",
                "image_size", "epoch", "test_acc", "optimizer", "scheduler", "scaler",
                "rng", "args"):
        assert key in last, key
    assert last["epoch"] == 2 and last["arch"] == "manet_resnet20"
    assert (last["num_classes"], last["in_channels"], last["image_size"]) == (10, 1, 16)
    assert last["data"] is None and last["args"]["batch_size"] == 16
    assert not any(k.startswith("module.") for k in last["model"])
    best = load_checkpoint(out / "best.pt")
    assert best["test_acc"] == pytest.approx(summary["best_test_acc"])
    # load_model rebuilds the network with either kernel flavour.
    for kernels in ("fused", "reference"):
        model, ckpt = load_model(out / "last.pt", kernels=kernels)
        assert not model.training and ckpt["epoch"] == 2
        for k, v in model.state_dict().items():
            assert torch.equal(v, last["model"][k]), k


def test_resume_after_sigkill_is_exact(tmp_path):
    args = ["--arch", "manet_resnet20", "--epochs", "2", "--explain-images", "0", *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(a)]) == 0

    # Run B: killed with SIGKILL in epoch 2, once its first step is done (the
    # optimizer has moved past the epoch-1 checkpoint). --debug-step-sleep makes the
    # run print a line after each step and pause, so the kill lands mid-epoch.
    cmd = [sys.executable, "-m", "manet_kernels.train", *args, "--out", str(b),
           "--debug-step-sleep", "0.5"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("debug: epoch 2 step 1 done"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert any(s.startswith("debug: epoch 2 step 1") for s in seen), "".join(seen)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(b / "last.pt")["epoch"] == 1  # killed before epoch 2 ended
    assert [r["epoch"] for r in _rows(b)] == ["1"]
    assert not (b / "summary.json").exists()

    assert main([*args, "--out", str(b), "--resume", "auto"]) == 0
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == 2
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"], cb["optimizer"]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    ra, rb = _rows(a), _rows(b)
    assert [[r[c] for c in EXACT] for r in ra] == [[r[c] for c in EXACT] for r in rb]


def _resume(out: Path, ckpt, *extra) -> list[str]:
    return ["--arch", "resnet20", "--out", str(out), "--resume", str(ckpt),
            "--explain-images", "0", *TINY, *extra]


def test_resuming_a_finished_run_reports_it_finished(tmp_path, capsys, resnet20_run):
    ckpt = load_checkpoint(resnet20_run / "last.pt")
    # From its checkpoint into a new folder: the summary is rebuilt from the checkpoint.
    out = tmp_path / "copy"
    assert main(_resume(out, resnet20_run / "last.pt", "--epochs", "1")) == 0
    assert "finished all 2 epochs, nothing to train" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_per_s"] is None
    assert summary["final_test_acc"] == ckpt["test_acc"]
    assert summary["best_test_acc"] == ckpt["best_acc"]
    assert not (out / "last.pt").exists()  # nothing trained, nothing saved
    # In its own folder, with the same or fewer epochs (or none): summary.json untouched.
    own = tmp_path / "own"
    own.mkdir()
    for name in ("last.pt", "summary.json", "log.csv"):
        (own / name).write_bytes((resnet20_run / name).read_bytes())
    before = (own / "summary.json").read_bytes()
    for extra in (["--epochs", "2"], ["--epochs", "1"], []):
        assert main(_resume(own, "auto", *extra)) == 0
        assert (own / "summary.json").read_bytes() == before
        assert load_checkpoint(own / "last.pt")["epoch"] == 2


def test_resume_with_another_schedule_is_refused(tmp_path, capsys, resnet20_run):
    last = resnet20_run / "last.pt"
    err = _error(capsys, _resume(tmp_path / "a", last, "--epochs", "3"))
    assert "--epochs 3 differs from the checkpoint's --epochs 2" in err
    assert "finished (2 epochs)" in err
    err = _error(capsys, _resume(tmp_path / "b", last, "--schedule", "step"))
    assert "--schedule step differs from the checkpoint's --schedule cosine" in err
    # Other steps per epoch (--limit-train 32: 2 batches of 16 instead of 3).
    err = _error(capsys, _resume(tmp_path / "c", last, "--limit-train", "32"))
    assert "3 steps per epoch, this one 2" in err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_unfinished_run_resumes_on_its_own_schedule(tmp_path, capsys, resnet20_run):
    # The 2-epoch run's checkpoint as if its run had been planned for 3 epochs.
    ckpt = load_checkpoint(resnet20_run / "last.pt")
    ckpt["args"]["epochs"] = 3
    save_checkpoint(ckpt, tmp_path / "part.pt")
    err = _error(capsys, _resume(tmp_path / "x", tmp_path / "part.pt", "--epochs", "2"))
    assert "--epochs 2 differs" in err and "stopped after epoch 2 of 3" in err
    out = tmp_path / "rest"
    assert main(_resume(out, tmp_path / "part.pt")) == 0  # --epochs left out: 3
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "arch": "resnet20", "epoch": 1}, path)

    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "arch": "resnet20", "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left

    save_checkpoint({"model": {"w": torch.zeros(3)}, "arch": "resnet20", "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*'model'"):
        load_checkpoint(tmp_path / "other.pt")


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "manet_kernels.train", "--arch", "manet_resnet20",
           "--epochs", "1", "--out", str(out), "--explain-images", "2", "--device", "cpu",
           *TINY]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_images"] == 24
    assert res.stdout.count('"world_size": 2') == 1  # only rank 0 reports
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert len(_rows(out)) == 1
    assert [Path(p).name for p in summary["maps"]] == ["attention_maps.png"]


@pytest.mark.parametrize("kind", ["cifar10", "folder"])
def test_trains_on_cifar_and_image_folders(tmp_path, kind):
    from test_data import _write_cifar10, _write_tree

    if kind == "cifar10":
        _write_cifar10(tmp_path / "data", n_per_batch=4)
        data = f"cifar10:{tmp_path / 'data'}"
    else:
        _write_tree(tmp_path / "data", classes=("a", "b", "c"), n=4)
        data = str(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--arch", "resnet20", "--data", data, "--image-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--threads", "1", "--no-progress", "--workers", "1",
                 "--explain-images", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_size"] == 8
    assert summary["train_images"] == (20 if kind == "cifar10" else 12)
    model, ckpt = load_model(out / "last.pt")
    assert ckpt["in_channels"] == 3 and ckpt["num_classes"] == (10 if kind == "cifar10" else 3)
    assert ckpt["data"] == data and model(torch.zeros(1, 3, 8, 8)).shape == (1, ckpt["num_classes"])
    assert summary["maps"]


def test_distillation_loss_and_run(tmp_path, resnet20_run):
    from manet_kernels.models import ABNOutput, classification_loss

    torch.manual_seed(0)
    s, t_logits = torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))

    class A:
        alpha, temperature = 1.0, 2.0

    assert torch.allclose(_loss(s, y, t_logits, A), classification_loss(s, y))
    A.alpha = 0.0
    p_t = torch.softmax(t_logits / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(_loss(s, y, t_logits, A), kl, atol=1e-6)
    A.alpha = 0.25
    out = ABNOutput(s, torch.randn(5, 10), torch.rand(5, 1, 2, 2))
    assert torch.allclose(_loss(out, y, t_logits, A),
                          0.25 * classification_loss(out, y) + 0.75 * kl, atol=1e-6)

    run = tmp_path / "student"
    assert main(["--arch", "manet_resnet20", "--epochs", "1", "--out", str(run),
                 "--teacher", str(resnet20_run / "last.pt"), "--alpha", "0.3",
                 "--temperature", "2", "--explain-images", "0", *TINY]) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["args"]["teacher"] == str(resnet20_run / "last.pt")
    assert math.isfinite(float(_rows(run)[0]["train_loss"]))


def test_lr_schedules():
    class A:
        epochs, warmup_epochs, schedule = 8, 0.0, "step"

    f = _lr_factor(A, 10)
    assert [f(e * 10) for e in range(8)] == pytest.approx([1, 1, 1, 1, .1, .1, .01, .01])
    assert f(39) == 1 and f(40) == pytest.approx(0.1)
    A.schedule = "cosine"
    f = _lr_factor(A, 10)
    assert f(0) == 1 and f(40) == pytest.approx(0.5) and f(80) == pytest.approx(0)
    A.warmup_epochs = 1.0
    f = _lr_factor(A, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert RECIPES["cifar"]["epochs"] == 160 and RECIPES["folder"]["epochs"] == 90


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _error_line(capsys, argv) -> str:
    """The one line argparse prints after the usage text."""
    err = _error(capsys, argv)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("manet-train: error: ")
    return line


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    common = ["--epochs", "1", "--out", str(tmp_path / "o"), *TINY]
    err = _error(capsys, [*common, "--arch", "manet_resnet21"])
    assert "--arch manet_resnet21" in err and "manet_resnet20" in err
    err = _error(capsys, [*common, "--data", str(tmp_path / "no_such_data")])
    assert "--data" in err and "no_such_data" in err
    bad = tmp_path / "cifar" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(b"garbage")
    err = _error(capsys, [*common, "--data", f"cifar10:{bad.parent}"])
    assert "data_batch_1" in err and "pickle" in err
    err = _error(capsys, [*common, "--amp", "fp8"])
    assert "--amp" in err and "fp8" in err
    err = _error(capsys, [*common, "--amp", "fp16", "--device", "cpu"])
    assert "--amp fp16" in err
    err = _error(capsys, [*common, "--resume", str(tmp_path / "nothing.pt")])
    assert "nothing.pt" in err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    err = _error(capsys, [*common, "--resume", str(tmp_path / "junk.pt")])
    assert "--resume" in err and "junk.pt" in err
    err = _error(capsys, [*common, "--teacher", str(tmp_path / "teacher.pt")])
    assert "--teacher" in err and "teacher.pt" in err
    err = _error(capsys, [*common, "--batch-size", "0"])
    assert "--batch-size" in err
    err = _error(capsys, [*common, "--device", "tpu"])
    assert "--device" in err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_another_arch(tmp_path, capsys, resnet20_run):
    err = _error(capsys, ["--arch", "manet_resnet20", "--epochs", "2", "--out",
                          str(tmp_path / "x"), "--resume", str(resnet20_run / "last.pt"),
                          *TINY])
    assert "resnet20" in err and "--arch manet_resnet20" in err


def test_help_documents_the_recipes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--explain-images" in text and "--epochs 160" in text and "--epochs 90" in text
    assert "--limit-train" not in text


def test_backend_errors_before_training(tmp_path, capsys, monkeypatch):
    common = ["--epochs", "1", "--out", str(tmp_path / "o"), *TINY]
    line = _error_line(capsys, [*common, "--backend", "nosuch"])
    assert "argument --backend: invalid choice: 'nosuch'" in line and "--arch" not in line
    if not torch.cuda.is_available():
        line = _error_line(capsys, [*common, "--backend", "cuda"])
        assert "--backend cuda needs a CUDA device, but no CUDA device is available" in line
    line = _error_line(capsys, [*common, "--backend", "cuda", "--device", "cpu"])
    assert "--backend cuda needs a CUDA device" in line
    monkeypatch.setenv("MANET_KERNELS_BACKEND", "nosuch")
    line = _error_line(capsys, common)
    assert "$MANET_KERNELS_BACKEND must be one of" in line and "'nosuch'" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("missing, argv, words", [
    (("sklearn", "sklearn.datasets", "sklearn.model_selection"), [],
     ["--data digits (the default) needs scikit-learn"]),
    (("PIL",), ["--explain-images", "2"], ["--explain-images 2", "needs pillow"]),
])
def test_missing_optional_dependency_is_one_line(tmp_path, capsys, monkeypatch, missing, argv,
                                                 words):
    for name in missing:  # None in sys.modules: `import name` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    line = _error_line(capsys, ["--epochs", "1", "--out", str(tmp_path / "o"), *TINY, *argv])
    assert all(w in line for w in words) and line.endswith('pip install "manet_kernels[train]"')
    assert not (tmp_path / "o").exists()


def test_no_progress_bar_without_tqdm(monkeypatch):
    class Args:
        no_progress = False

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert train_cli._want_progress(Args, _Dist())
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.warns(UserWarning, match=r"tqdm is not installed.*manet_kernels\[train\]"):
        assert not train_cli._want_progress(Args, _Dist())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_stops_the_run(tmp_path, capsys, monkeypatch, bad):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's: must not survive this one
    calls, real = [], _loss

    def loss_going_bad(*a):
        calls.append(1)
        loss = real(*a)
        return loss * bad if len(calls) == 5 else loss  # epoch 2 (3 steps each), step 2

    monkeypatch.setattr(train_cli, "_loss", loss_going_bad)
    assert main(["--arch", "resnet20", "--epochs", "3", "--out", str(out),
                 "--explain-images", "0", *TINY]) == 1
    captured = capsys.readouterr()
    assert "manet-train: error: epoch 2 step 2 of 3: the training loss is not finite" in \
        captured.err
    assert "epoch 2/3" not in captured.out and '"best_test_acc"' not in captured.out
    assert not (out / "summary.json").exists()
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and len(_rows(out)) == 1


def test_fp16_scaler_skips_are_tolerated_until_too_many():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x = torch.randn(4, 3)
    steps = MAX_SKIPPED_IN_A_ROW + 5
    watch = _LossWatch(0, steps, torch.device("cpu"), _Dist())

    def step(i, factor):
        loss = model(x).pow(2).mean() * factor
        w = model.weight.detach().clone()
        stepped = _optimizer_step(loss, opt, sched, scaler)
        watch.after_step(i, torch.isfinite(loss.detach()), stepped)
        return stepped, torch.equal(w, model.weight)

    assert step(0, 1.0) == (True, False)
    # A loss that overflows: the scaler skips the step, the weights stay.
    for i in range(1, MAX_SKIPPED_IN_A_ROW):
        assert step(i, math.inf) == (False, True)
    assert step(MAX_SKIPPED_IN_A_ROW, 1.0)[0]  # a good step ends the series
    assert watch.skipped == MAX_SKIPPED_IN_A_ROW - 1
    for i in range(MAX_SKIPPED_IN_A_ROW + 1, 2 * MAX_SKIPPED_IN_A_ROW):
        step(i, math.nan)
    with pytest.raises(TrainingDiverged, match=f"epoch 1 step {2 * MAX_SKIPPED_IN_A_ROW + 1} "
                                               f"of {steps}.*skipped {MAX_SKIPPED_IN_A_ROW} "
                                               "steps in a row"):
        step(2 * MAX_SKIPPED_IN_A_ROW, math.nan)


@pytest.mark.parametrize("arch, given, expected", [
    ("resnet20_brnpa", None, 1.0), ("aw_resnet20_brnpa", None, 1.0), ("resnet20", None, 0.0),
    ("resnet20_brnpa", "0", 0.0)])
def test_warmup_default_per_arch(arch, given, expected):
    argv = ["--arch", arch] + ([] if given is None else ["--warmup-epochs", given])
    args = train_cli.build_parser().parse_args(argv)
    train_cli._resolve_defaults(args)
    assert args.warmup_epochs == expected


# --------------------------------------------------------------- timm models (--arch timm:)

requires_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                   reason="needs timm")
TIMM = ["--arch", "timm:resnet10t", "--timm-args", '{"block_args": {"attn_layer": "cbam"}}']


@requires_timm
def test_timm_arch_trains_resumes_exactly_and_explains_with_grad_cam(tmp_path, capsys,
                                                                    monkeypatch):
    """A converted timm CBAM ResNet: trained on the fused kernels, resumed bit for bit,
    Grad-CAM maps, and a checkpoint whose weights are a plain timm state_dict that
    load_model (manet-explain) rebuilds."""
    import timm

    import manet_kernels.checkpoint as ckpt_mod
    from manet_kernels.models import from_timm

    save = ckpt_mod.save_checkpoint

    def save_and_keep_epoch_1(ckpt, path):  # the epoch-1 checkpoint, to resume from
        save(ckpt, path)
        if ckpt["epoch"] == 1 and path.name == "last.pt":
            save(ckpt, tmp_path / "epoch1.pt")

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_and_keep_epoch_1)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*TIMM, "--epochs", "2", "--out", str(a), "--explain-images", "2",
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert "timm:resnet10t: 4 module(s) on the fused kernels (CbamModule)" in printed
    summary = json.loads((a / "summary.json").read_text())
    assert summary["arch"] == "timm:resnet10t" and len(summary["maps"]) == 1
    assert Path(summary["maps"][0]).is_file()
    assert main([*TIMM, "--out", str(b), "--resume", str(tmp_path / "epoch1.pt"),
                 "--explain-images", "0", *TINY]) == 0
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == 2
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert [r[c] for c in EXACT for r in _rows(a)[1:]] == [r[c] for c in EXACT
                                                           for r in _rows(b)]
    assert ca["model_options"] == {"timm_args": {"block_args": {"attn_layer": "cbam"}}}
    plain = timm.create_model("resnet10t", num_classes=10, in_chans=1,
                              block_args={"attn_layer": "cbam"})
    plain.load_state_dict(ca["model"])  # strict: timm's own keys
    model, _ = load_model(a / "last.pt")
    assert sum(type(m) is from_timm.CbamModule for m in model.modules()) == 4
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    err = _error(capsys, ["--arch", "timm:resnet10t", "--out", str(tmp_path / "c"),
                          "--resume", str(a / "last.pt"), *TINY])
    assert 'trained with --timm-args {"block_args": {"attn_layer": "cbam"}}, not null' in err


@requires_timm
def test_timm_arch_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    common = ["--epochs", "1", "--out", str(tmp_path / "o"), *TINY]
    line = _error_line(capsys, [*common, "--arch", "timm:resnet18x"])
    assert "--arch timm:resnet18x: unknown timm model 'resnet18x'; did you mean" in line
    line = _error_line(capsys, [*common, *TIMM[:3], "{block_args: cbam}"])
    assert "--timm-args is not valid JSON" in line
    line = _error_line(capsys, [*common, *TIMM[:3], "[1, 2]"])
    assert "--timm-args must be a JSON object" in line
    line = _error_line(capsys, [*common, "--arch", "resnet20", *TIMM[2:]])
    assert "--timm-args needs --arch timm:<name>, not --arch resnet20" in line
    line = _error_line(capsys, [*common, *TIMM[:3], '{"num_classes": 3}'])
    assert "must not set ['num_classes']" in line
    line = _error_line(capsys, [*common, *TIMM[:3], '{"no_such_arg": 3}'])
    assert "--arch timm:resnet10t" in line and "no_such_arg" in line
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    monkeypatch.delitem(sys.modules, "manet_kernels.models.from_timm", raising=False)
    line = _error_line(capsys, [*common, *TIMM])
    assert "--arch timm:resnet10t needs the timm package" in line
    assert "pip install --no-deps timm" in line
    assert not (tmp_path / "o").exists()
