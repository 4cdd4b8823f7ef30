"""Counting the device-level operations one step dispatches, with ``torch.profiler``.

What counts, read off the profiler's CPU event tree (``prof.events()``, each event with
its ``cpu_children``), walked from the roots down; the first rule that applies decides:

1. A ``manet_kernels::`` op counts once, as a unit, and what runs inside it is not
   looked at: it is one kernel boundary, the same on every backend (the C++ CPU kernels
   allocate their outputs and some call ATen inside, which a GPU kernel does not). The
   exception is an op inside which another ``manet_kernels::`` op runs (the Python
   custom ops ``manet_kernels::mixed_attention`` and the like): it is a wrapper, and
   its contents are counted instead.
2. An ATen op that the dispatcher decomposes before any kernel runs
   (CompositeImplicitAutograd: ``linear``, ``matmul``, ``contiguous``, ``reshape``,
   ``to``, ``conv2d``, ``value_selecting_reduction_backward``, ...) is not an operation
   of its own: its contents are counted. So is an op whose child has its own name (an
   implicit overload, e.g. ``where(cond, 0.0, t)``, calling the kernel overload).
3. Any other ATen op counts once if it does work (compute, a copy, a fill, a factory
   that fills such as ``zeros`` or ``scalar_tensor``, a device-to-host ``item``), and
   what it calls inside is not looked at: on CPU ``mean`` is ``sum`` then ``div_``,
   ``addmm`` copies its bias first, ``add(x, 1)`` converts the wrapped scalar with
   ``to``, a reduction fills its output first; on a GPU each is one kernel. It counts
   zero if it does no work: ``NO_WORK`` (views and metadata changes, allocation
   without a fill, ``resize_``, conjugation flags).
4. Anything else (autograd nodes such as ``MulBackward0``, the engine's
   ``evaluate_function`` wrappers, ``record_function`` ranges): its contents are
   counted.

So ``x.view(...)``, ``x.contiguous()`` of a contiguous ``x``, ``x.to(x.dtype)`` and
``torch.empty`` count 0; ``x.to(torch.float64)`` counts 1 (``_to_copy``);
``(x + 1) * 2`` counts 2. The count is a proxy for GPU launches, not a GPU
measurement: a few ATen ops launch more than one kernel on a GPU (cuDNN's
``convolution_backward``, ``index_put_`` with accumulation), which count 1 here.

The profiler records the calling thread, where CPU autograd also runs the backward
(the autograd engine's own threads inherit the profiler too); work started on other
Python threads is not seen. The step runs with one intra-op thread so that nothing
depends on the machine's core count.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

KERNEL_PREFIX = "manet_kernels::"

# ATen ops that do no work on the data: views and metadata changes, allocation without
# a fill, and flags. Profiler names, without the overload.
NO_WORK = frozenset(f"aten::{n}" for n in """
    view _unsafe_view _reshape_alias as_strided as_strided_ permute transpose transpose_
    t t_ expand select slice unsqueeze unsqueeze_ squeeze squeeze_ split split_with_sizes
    unbind diagonal detach detach_ alias lift_fresh _conj _neg_view
    empty empty_like empty_strided new_empty new_empty_strided resize_ resize_as_ set_
    """.split())


@functools.cache
def _overloads() -> dict[str, list[str]]:
    """Profiler name ("aten::add") -> the dispatcher's full names of its overloads,
    less the ``out=`` variants (``linear.out`` has a kernel, ``linear`` does not)."""
    table = collections.defaultdict(list)
    for full in torch._C._dispatch_get_all_op_names():
        name, _, overload = full.partition(".")
        if overload != "out" and not overload.endswith("_out"):  # only called with out=
            table[name].append(full)
    return table


@functools.cache
def _decomposes(name: str) -> bool:
    """Whether every overload of the op ``name`` ("aten::linear") is
    CompositeImplicitAutograd, i.e. never reaches a kernel of its own."""
    overloads = _overloads().get(name)
    return bool(overloads) and all(torch._C._dispatch_has_kernel_for_dispatch_key(
        full, "CompositeImplicitAutograd") for full in overloads)


def _has_kernel_op(event) -> bool:
    return any(c.name.startswith(KERNEL_PREFIX) or _has_kernel_op(c)
               for c in event.cpu_children)


def _count(event, counts: collections.Counter) -> None:
    name = event.name
    if name.startswith(KERNEL_PREFIX) and not _has_kernel_op(event):
        counts[name] += 1
        return
    is_aten = name.startswith("aten::")
    if is_aten and not _decomposes(name) and all(c.name != name for c in event.cpu_children):
        if name not in NO_WORK:
            counts[name] += 1
        return
    for child in event.cpu_children:
        _count(child, counts)


def count_events(events) -> collections.Counter:
    """The counted op names of a profiler event list (see the module docstring)."""
    counts: collections.Counter = collections.Counter()
    for event in events:
        if event.cpu_parent is None:
            _count(event, counts)
    return counts


def count_launches(step: Callable[[], object], warmup: int = 1) -> collections.Counter:
    """Run ``step`` ``warmup`` times (first-call effects: lazy initialisation, caches),
    then once under the profiler; return the counted op names (``sum(c.values())`` is
    the count). Runs with one intra-op thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        torch.set_num_threads(threads)
    return count_events(prof.events())


def fwd_bwd_step(forward: Callable[[], object], inputs: Sequence[torch.Tensor]
                 ) -> Callable[[], tuple]:
    """A step that runs ``forward()`` and its backward to ``inputs`` (every tensor
    that requires grad: the input and the parameters) with ``torch.autograd.grad``.
    The upstream gradients are made here, once, so they are not counted; nothing is
    accumulated into ``.grad`` (that is the optimiser's business, not the op's)."""
    def outputs():
        out = forward()
        return list(out) if isinstance(out, (tuple, list)) else [out]

    with torch.no_grad():
        grads = [torch.randn_like(o) for o in outputs()]

    def step():
        return torch.autograd.grad(outputs(), list(inputs), grads)
    return step


@contextlib.contextmanager
def triton_launches_as_ops():
    """Each Triton kernel launch (compiled or interpreted) shows in the profiler as one
    ``manet_kernels::triton::<kernel>`` range, which the count treats as one kernel:
    what the interpreter runs inside (NumPy, tensor copies) is not looked at."""
    import triton.runtime.jit as jit
    from triton.runtime import interpreter

    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            if kwargs.get("warmup"):
                return _run(self, *args, **kwargs)
            with torch.profiler.record_function(f"{KERNEL_PREFIX}triton::{self.__name__}"):
                return _run(self, *args, **kwargs)
        cls.run = counted
        patched.append((cls, run))
    try:
        yield
    finally:
        for cls, run in patched:
            cls.run = run


def format_counts(counts: collections.Counter) -> str:
    """``"N ops: name xk, ..."``, most frequent first, for test output."""
    parts = ", ".join(f"{n} x{k}" for n, k in counts.most_common())
    return f"{sum(counts.values())} ops: {parts}"
