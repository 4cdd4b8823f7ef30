"""The build produced what was asked of it."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.ops._common import resolve_backend


def test_extension_loaded_when_built():
    if os.environ.get("MANET_KERNELS_NO_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    assert _ext.HAS_EXT, _ext.EXT_ERROR


def test_only_the_composite_ops_are_public():
    """The compiled pass ops are private (``manet_kernels::_<pass>``, torchvision's
    ``_roi_align_backward`` style); the only public names are the composite ops."""
    import manet_kernels  # noqa: F401  (registers the composite ops)

    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("manet_kernels::")}
    ops = ("mixed_attention", "brnpa", "aw_conv2d", "per_sample_conv2d")
    assert {n for n in names if not n.startswith("_")} == {
        n for op in ops for n in (op, f"{op}_backward")}
    if _ext.HAS_EXT:
        assert {"_mixed_attention_apply", "_brnpa_step", "_aw_conv2d_bwd"} <= names


def test_cuda_kernels_registered_when_required():
    """CI sets MANET_KERNELS_CUDA=1: the CUDA kernels must then be compiled and
    registered, even on a machine with no GPU to run them."""
    if os.environ.get("MANET_KERNELS_CUDA") != "1":
        pytest.skip("CUDA build not required here")
    assert _ext.HAS_CUDA_KERNELS
    for stage in ("channel_pool", "spatial_pool", "apply", "bwd_reduce", "bwd_channel",
                  "bwd_dx"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"manet_kernels::_mixed_attention_{stage}", "CUDA"), stage
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"manet_kernels::_mixed_attention_{stage}", "CPU"), stage
    for op in ("aw_conv2d_fwd", "aw_conv2d_bwd", "per_sample_conv2d_fwd",
               "per_sample_conv2d_bwd"):
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"manet_kernels::_{op}", key), \
                (op, key)
        assert _ext.has_kernel(op, "cuda"), op


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "manet_kernels")

# Run in a fresh interpreter; the checkout's editable install (if any) would map
# manet_kernels._C to the checkout's library whatever copy of the package is imported.
_NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                "if not getattr(f, '__module__', '').startswith('__editable__')]; ")
_TRY_CPU = """
import torch, manet_kernels
print('HAS_EXT', manet_kernels._ext.HAS_EXT)
try:
    manet_kernels.brnpa(torch.randn(1, 2, 3, 3), 1, backend='cpu')
except RuntimeError as e:
    print('ERROR', e)
"""


def _python(code, cwd, **env):
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_unbuilt_package_says_so(tmp_path):
    """A package copied without its library (what an install without the extension
    gives) says so plainly, not 'partially initialized module ... circular import'."""
    shutil.copytree(PKG, tmp_path / "manet_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = _python(_NO_EDITABLE + _TRY_CPU, tmp_path, MANET_KERNELS_LIB="")
    assert "HAS_EXT False" in out
    err = out.split("ERROR ", 1)[1]
    assert err.startswith("backend='cpu': manet_kernels was installed without its compiled "
                          "kernels (no manet_kernels._C library in "), err
    assert "reinstall with `pip install --no-build-isolation .`" in err
    assert "circular" not in err


def test_library_that_fails_to_load_says_so(tmp_path):
    bogus = tmp_path / "nosuch.so"
    out = _python(_TRY_CPU, tmp_path, MANET_KERNELS_LIB=str(bogus))
    assert "HAS_EXT False" in out
    err = out.split("ERROR ", 1)[1]
    assert err.startswith("backend='cpu': its compiled kernels failed to load (OSError: "), err
    assert str(bogus) in err


def test_missing_extension_error_for_cuda(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "a reason")
    with pytest.raises(RuntimeError, match=r"^backend='cuda': .*\(a reason\); reinstall with"):
        resolve_backend("cuda", torch.device("cuda"), "brnpa_step")


_SETUP_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
                        "sys.argv = ['setup.py'] + sys.argv[1:]; "
                        "runpy.run_path('setup.py', run_name='__main__')")


def _setup_without_torch(tmp_path, *args):
    return subprocess.run([sys.executable, "-c", _SETUP_WITHOUT_TORCH, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MANET_KERNELS_NO_EXT": ""})


def test_build_without_torch_fails_with_advice(tmp_path):
    """pip's isolated build has no torch: the build must stop and say what to run
    (a warning would be hidden by pip and the package would have no kernels)."""
    out = _setup_without_torch(tmp_path, "build_ext", "--build-temp", str(tmp_path),
                               "--build-lib", str(tmp_path))
    assert out.returncode != 0
    assert "error: torch is not importable in the build environment" in out.stderr
    assert "pip install --no-build-isolation ." in out.stderr
    assert "MANET_KERNELS_NO_EXT=1" in out.stderr


def test_metadata_without_torch(tmp_path):
    """pip's metadata step (egg_info) needs no torch."""
    out = _setup_without_torch(tmp_path, "egg_info", "--egg-base", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "manet_kernels.egg-info" / "PKG-INFO").is_file()


def _load_build_stamp():
    spec = importlib.util.spec_from_file_location(
        "build_stamp", os.path.join(ROOT, "scripts", "build_stamp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def stamp_root(tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "op.cpp").write_text("int f();\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "README.md").write_text("docs\n")
    return tmp_path


def test_stamp_changes_with_every_build_input(stamp_root, monkeypatch):
    """scripts/setup.sh skips the build only when nothing the build reads changed."""
    bs = _load_build_stamp()
    env = {"MANET_KERNELS_CUDA": "0"}
    bs.write_stamp(str(stamp_root), env)
    assert bs.stamp_matches(str(stamp_root), env)
    (stamp_root / "README.md").write_text("other docs\n")  # not a build input
    os.utime(stamp_root / "csrc" / "cpu" / "op.cpp")  # touched, same contents
    assert bs.stamp_matches(str(stamp_root), env)
    for var in bs.SWITCHES:
        assert not bs.stamp_matches(str(stamp_root), {**env, var: "changed"}), var
    edits = [("csrc/cpu/op.cpp", "int g();\n"), ("csrc/cuda/new.cu", "\n"),
             ("setup.py", "setup(x=1)\n"), ("pyproject.toml", "[project]\nname='x'\n")]
    for rel, text in edits:
        bs.write_stamp(str(stamp_root), env)
        (stamp_root / rel).parent.mkdir(exist_ok=True)
        (stamp_root / rel).write_text(text)
        assert not bs.stamp_matches(str(stamp_root), env), rel
    bs.write_stamp(str(stamp_root), env)
    monkeypatch.setattr(bs, "_torch_version", lambda: "2.99.0 at /elsewhere")
    assert not bs.stamp_matches(str(stamp_root), env)


def test_no_stamp_means_rebuild(stamp_root):
    assert not _load_build_stamp().stamp_matches(str(stamp_root), {})
