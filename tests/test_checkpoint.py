"""Checkpoints: the stored checksum, refusing damaged files with one clear line each,
old checkpoints without a checksum, atomic saving, and the CLIs on a corrupt file."""

import contextlib
import math
import os
import re
import warnings

import pytest
import torch

from manet_kernels.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    checksum,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from manet_kernels.cli.explain import main as explain_main
from manet_kernels.cli.train import main as train_main
from manet_kernels.models import create

# 256 distinct bytes: their run is found in the saved file at the tensor's data offset.
PATTERN = torch.arange(256, dtype=torch.uint8).repeat(4)
TRAIN_TINY = ["--image-size", "16", "--limit-train", "32", "--limit-test", "16",
              "--batch-size", "16", "--threads", "1", "--no-progress"]


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _flip(path, needle: bytes = bytes(range(256)), n: int = 400):
    """Invert ``n`` bytes of the file from where ``needle`` (a tensor's data) starts."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "the tensor's bytes are not in the file"
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _pattern_ckpt(path, **extra):
    return save_checkpoint({"model": {"w": PATTERN.clone()}, "arch": "resnet20", "epoch": 1,
                            **extra}, path)


def _model_ckpt(path):
    model = create("resnet20", 10, in_channels=1)
    return save_checkpoint({"model": model.state_dict(), "arch": "resnet20", "num_classes": 10,
                            "in_channels": 1, "model_options": {}, "data": "digits",
                            "image_size": 16, "epoch": 1, "test_acc": 0.5}, path), model


def _weight_bytes(model) -> bytes:
    """The classifier weight's first 64 floats: random, so found once, at its data."""
    return model.fc.weight.detach().reshape(-1)[:64].numpy().tobytes()


# --------------------------------------------------------------------- round trip

def test_round_trip_every_value_kind(tmp_path):
    base = torch.arange(12, dtype=torch.float64).view(3, 4)
    obj = {"model": {"a": torch.randn(2, 3), "b16": torch.randn(5).bfloat16(),
                     "t": base.t(), "slice": base[1:, ::2], "scalar": torch.tensor(7),
                     "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)},
           "arch": "resnet20", "nan": math.nan, "neg0": -0.0, "flag": True, "none": None,
           "size": torch.Size([2, 3]), "dtype": torch.float16, "z": 1 + 2j, "blob": b"\x00\x01",
           "nested": [1, (2, "x"), {"k": [0.5]}], 3: "int key", "rng": list(range(625))}
    path = tmp_path / "a.pt"
    with _no_warnings():
        save_checkpoint(obj, path)
        back = load_checkpoint(path)
    assert CHECKSUM_KEY not in obj and CHECKSUM_KEY not in back  # caller's dict untouched
    assert list(back) == list(obj)
    for k, v in obj["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v)
    plain = {k: v for k, v in obj.items() if k not in ("model", "nan")}
    assert {k: back[k] for k in plain} == plain and math.isnan(back["nan"])
    assert math.copysign(1, back["neg0"]) == -1
    # The file is an ordinary weights_only torch file carrying its checksum.
    raw = torch.load(path, weights_only=True)
    assert raw[CHECKSUM_KEY] == checksum(back) and raw[CHECKSUM_KEY].startswith("sha256-v1:")
    # Saving a loaded checkpoint again (the trainer's resume) replaces the checksum.
    save_checkpoint({**raw, "epoch": 2}, path)
    with _no_warnings():
        assert load_checkpoint(path)["epoch"] == 2


@pytest.mark.parametrize("a, b", [
    ({"w": torch.zeros(4, dtype=torch.uint8)}, {"w": torch.zeros(2, 2, dtype=torch.uint8)}),
    ({"w": torch.zeros(2, dtype=torch.int16)}, {"w": torch.zeros(4, dtype=torch.int8)}),
    ({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0 + 2 ** -20])}),
    ({"x": 1}, {"x": True}), ({"x": 1}, {"x": 1.0}), ({"x": "1"}, {"x": b"1"}),
    ({"x": [1, 2]}, {"x": (1, 2)}), ({"x": [[1], 2]}, {"x": [1, [2]]}),
    ({"x": ["ab", "c"]}, {"x": ["a", "bc"]}), ({"x": 0.0}, {"x": -0.0}),
    ({"x": None}, {"x": "None"}), ({"a": 1, "b": 2}, {"a": 2, "b": 1}),
    ({"x": [1, 2]}, {"x": [1, 2.0]}),
])
def test_checksum_tells_apart(a, b):
    assert checksum(a) != checksum(b) and checksum(a) == checksum(dict(a))


def test_checksum_same_on_device_and_view():
    base = torch.randn(4, 6)
    assert checksum({"w": base[:, ::2]}) == checksum({"w": base[:, ::2].contiguous()})
    z = torch.randn(3, dtype=torch.complex64)
    assert checksum({"w": z.conj()}) == checksum({"w": z.conj().resolve_conj()})
    assert checksum({"s": {3, 1, 2}}) == checksum({"s": {2, 3, 1}})


def test_save_refuses_what_it_cannot_checksum(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\[0\]: cannot checksum a object"):
        save_checkpoint({"model": {}, "arch": "x", "extra": [object()]}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="obj must be a dict, got list"):
        save_checkpoint([1], tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_fsync_then_replace(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    path = _pattern_ckpt(tmp_path / "last.pt")
    assert events[0] == "fsync" and events[1][0] == "replace"  # data on disk before the rename
    tmp = events[1][1]
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".tmp")
    assert events[1][2] == str(path) and events[2:] == ["fsync"]  # then the folder entry
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------ corruption

def test_flipped_tensor_bytes_are_refused(tmp_path):
    path = _flip(_pattern_ckpt(tmp_path / "flip.pt"))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], PATTERN)
    with pytest.raises(CheckpointError, match=r"flip\.pt is corrupted: checksum mismatch"):
        load_checkpoint(path)
    # verify=False (a look at the metadata only) does not hash.
    assert load_checkpoint(path, verify=False)["epoch"] == 1


def test_load_model_refuses_flipped_weights(tmp_path):
    path, model = _model_ckpt(tmp_path / "model.pt")
    loaded, _ = load_model(path, kernels="reference")
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    _flip(path, needle=_weight_bytes(model), n=400)
    with pytest.raises(ValueError, match=r"model\.pt is corrupted: checksum mismatch"):
        load_model(path)


def test_edited_metadata_is_refused(tmp_path):
    path = _pattern_ckpt(tmp_path / "e.pt")
    raw = torch.load(path, weights_only=True)
    raw["epoch"] = 9  # torch.save keeps the stale checksum
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    raw[CHECKSUM_KEY] = 12345
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"e\.pt is corrupted: its checksum entry is "
                                              r"unreadable \('12345'\)"):
        load_checkpoint(path)


def test_old_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": PATTERN}, "arch": "resnet20", "epoch": 4}, path)
    with pytest.warns(UserWarning, match=r"old\.pt has no checksum .* without an integrity "
                                         "check"):
        ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 4 and torch.equal(ckpt["model"]["w"], PATTERN)
    # The legacy (pre-zip) format too.
    torch.save({"model": {}, "arch": "x"}, path, _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="no checksum"):
        assert load_checkpoint(path)["arch"] == "x"


def _bad_files(tmp_path):
    good = _pattern_ckpt(tmp_path / "good.pt").read_bytes()
    torch.save({"model": 1}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    # Damaged pickle inside an intact zip: the bytes after data.pkl's protocol header.
    pkl = good.find(b"\x80\x02", good.find(b"data.pkl"))
    damaged = good[:pkl + 2] + bytes(b ^ 0xFF for b in good[pkl + 2:pkl + 12]) + good[pkl + 12:]
    return {
        "text.pt": (b"epoch 3\nloss 0.25\n", r"is a text file, not a torch checkpoint "
                                             r"\(it starts 'epoch 3\\nloss 0.25\\n'\)"),
        "empty.pt": (b"", r"is an empty file \(0 bytes\)"),
        "random.pt": (bytes(range(7, 256)) * 8, r"is not a torch checkpoint \(unknown format, "
                                                r"first bytes 07 08 09"),
        "half.pt": (good[:len(good) // 2], rf"is truncated \({len(good) // 2} bytes; the end of "
                                           "its zip archive is missing"),
        "cut10.pt": (good[:-10], "is truncated"),
        "legacy_half.pt": (legacy[:len(legacy) // 2], "is truncated .*legacy torch file"),
        "pickle.pt": (damaged, r"is corrupted \(a damaged torch zip archive: Unsupported "
                               "operand"),
    }


def test_bad_files_each_say_what_is_wrong(tmp_path):
    for name, (data, message) in _bad_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        text = str(info.value)
        assert re.search(rf"^checkpoint \S*{re.escape(name)} {message}", text), text
        assert "\n" not in text and "weights_only" not in text, text


def test_missing_directory_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)
    import numpy as np

    torch.save({"model": np.zeros(2)}, tmp_path / "np.pt")
    with pytest.raises(CheckpointError, match=r"np\.pt is not a manet-train checkpoint: it "
                                              r"holds objects a safe load refuses \(Unsupported "
                                              r"global: GLOBAL numpy\S*\)$") as info:
        load_checkpoint(tmp_path / "np.pt")
    assert "weights_only" not in str(info.value)
    save_checkpoint({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"lacks the key\(s\) \['model', 'arch'\]"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected the dict"):
        load_checkpoint(tmp_path / "list.pt")


# ------------------------------------------------------------------------------ CLIs

def _cli_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err
    return err.strip().splitlines()[-1]  # argparse's usage line, then the one-line error


def test_explain_refuses_corrupt_and_bad_files(tmp_path, capsys):
    good, _ = _model_ckpt(tmp_path / "good.pt")
    bad, model = _model_ckpt(tmp_path / "bad.pt")
    _flip(bad, needle=_weight_bytes(model))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = [
        (["maps", bad], r"bad\.pt is corrupted: checksum mismatch"),
        (["sparsity", bad], r"bad\.pt is corrupted: checksum mismatch"),
        (["stability", good, bad, "--n", "2"], r"bad\.pt is corrupted: checksum mismatch"),
        (["maps", tmp_path / "text.pt"], r"text\.pt is a text file, not a torch checkpoint"),
        (["maps", tmp_path / "empty.pt"], r"empty\.pt is an empty file"),
        (["maps", tmp_path], "is a directory, not a checkpoint file"),
    ]
    for argv, message in cases:
        line = _cli_error(capsys, explain_main, [*argv, "--device", "cpu"])
        assert line.startswith("manet-explain: error: checkpoint ") and re.search(message, line), \
            (argv, line)


def test_train_resume_and_teacher_refuse_a_corrupt_file(tmp_path, capsys):
    bad = _flip(_pattern_ckpt(tmp_path / "bad.pt"))
    common = ["--arch", "resnet20", "--epochs", "1", "--out", tmp_path / "run",
              "--explain-images", "0", *TRAIN_TINY]
    for flag in ("--resume", "--teacher"):
        line = _cli_error(capsys, train_main, [*common, flag, bad])
        assert re.fullmatch(rf"manet-train: error: {flag}: checkpoint \S*bad\.pt is corrupted: "
                            r"checksum mismatch \(stored sha256-v1:\w+\.\.\., contents hash "
                            r"to sha256-v1:\w+\.\.\.\)", line), line
        assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained
    (tmp_path / "empty.pt").write_bytes(b"")
    line = _cli_error(capsys, train_main, [*common, "--resume", tmp_path / "empty.pt"])
    assert line.endswith("empty.pt is an empty file (0 bytes)"), line


def test_checksum_is_cheap_next_to_saving(tmp_path):
    """On a ResNet-20 training checkpoint (weights + momentum), hashing costs a fraction
    of serialising: it reads the same bytes once, in C."""
    import time

    model = create("resnet20", 10, kernels="reference")
    momentum = {i: {"momentum_buffer": torch.randn_like(p)}  # SGD's state_dict layout
                for i, p in enumerate(model.parameters())}
    obj = {"model": model.state_dict(), "optimizer": {"state": momentum}, "arch": "resnet20"}

    def best(fn):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_hash = best(lambda: checksum(obj))
    t_save = best(lambda: torch.save(obj, tmp_path / "plain.pt"))
    assert t_hash < t_save, (t_hash, t_save)
