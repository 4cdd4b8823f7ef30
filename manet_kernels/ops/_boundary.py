"""One op boundary, declared once.

From an op's forward and backward bodies, their fakes and what its backward needs,
``Boundary`` registers ``manet_kernels::<name>`` and ``manet_kernels::<name>_backward``
(fakes, ``register_autograd``), gives the direct path (the same bodies in a plain
``torch.autograd.Function`` when ``eager_ok``) and builds the drop-in ``*Function``
classes on that same path. One description, so the three autograd entry points of an
op cannot drift apart.

The backward op takes ``(*grads of the first grad_outputs outputs, *saved tensors,
*flags)`` and returns one gradient per entry of ``grad_inputs``; a ``None`` gradient
becomes an empty tensor at the registered op (its schema returns tensors only).
Gradients of unused outputs are not materialised: the backward gets ``None`` for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from manet_kernels.ops._common import eager_ok

__all__ = ["Boundary", "drop_in_function"]


def _given(t) -> bool:
    return t is not None


def _filled(grads):
    """The registered backward's result: empty tensors where the body gave ``None``."""
    if isinstance(grads, Tensor):
        return grads
    like = next(g for g in grads if g is not None)
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _leading_tensor_args(schema) -> int:
    n = 0
    for arg in schema.arguments:
        if not str(arg.type).startswith(("Tensor", "Optional[Tensor]")):
            break
        n += 1
    return n


class Boundary:
    """The registered forward/backward pair of one fused op and its autograd rule.

    Args:
        name: the op's name in the ``manet_kernels`` namespace.
        forward, backward: the bodies, type-annotated (the op schemas are inferred).
        forward_fake, backward_fake: their shape/dtype-only versions.
        save: ``(inputs, outputs) -> (tensors, flags)``, what the backward takes after
            the output gradients.
        grad_inputs: the input positions the backward returns gradients for, in order.
        grad_outputs: the number of leading outputs that carry gradients; the others
            are marked non-differentiable.
    """

    def __init__(self, name: str, forward: Callable, backward: Callable, *,
                 forward_fake: Callable, backward_fake: Callable,
                 save: Callable, grad_inputs: Sequence[int], grad_outputs: int = 1):
        fwd = torch.library.custom_op(f"manet_kernels::{name}", forward, mutates_args=())
        fwd.register_fake(forward_fake)
        bwd = torch.library.custom_op(
            f"manet_kernels::{name}_backward", lambda *a: _filled(backward(*a)),
            mutates_args=(), schema=torch.library.infer_schema(backward, mutates_args=()))
        bwd.register_fake(lambda *a: _filled(backward_fake(*a)))
        fwd.register_autograd(self._registered_backward, setup_context=self.setup)
        self.forward_body, self.backward_body = forward, backward
        # OpOverloads: what torch.compile traces as one opaque node each way
        self.op, self.backward_op = fwd._opoverload, bwd._opoverload
        self.save, self._grad_inputs, self.grad_outputs = save, tuple(grad_inputs), grad_outputs
        self._n_inputs = len(self.op._schema.arguments)
        self._n_tensors = _leading_tensor_args(self.op._schema)
        self._direct = _direct_function(self)

    def __call__(self, *args):
        """The op with autograd: its bodies called directly when ``eager_ok`` (the
        custom-op machinery costs host time a short GPU step cannot hide; same
        functions, same results), else the registered op."""
        if self.eager(args):
            rest = []  # the outputs that carry no gradient, beside autograd (see _direct)
            out = self._direct.apply(rest, *args)
            return out + rest[0] if rest[0] else out
        return self.op(*args)

    def eager(self, args) -> bool:
        """Whether the op's arguments ``args`` may take the direct path."""
        return eager_ok(*args[:self._n_tensors])

    def setup(self, ctx, inputs, output, *, all_returned: bool = True) -> None:
        """``all_returned``: every output is returned to autograd (a drop-in returns
        only the differentiable ones, and Dynamo refuses marks on the others)."""
        outputs = output if isinstance(output, tuple) else (output,)
        tensors, flags = self.save(inputs, outputs)
        ctx.save_for_backward(*tensors)
        ctx.flags = flags
        # None marks an absent input; the dtype casts each gradient back to its input's
        ctx.grad_dtypes = [None if inputs[i] is None else inputs[i].dtype
                           for i in self._grad_inputs]
        ctx.set_materialize_grads(False)
        if all_returned and len(outputs) > self.grad_outputs:
            ctx.mark_non_differentiable(*outputs[self.grad_outputs:])

    def backward(self, ctx, grads, body) -> tuple:
        """One gradient per op input from the output gradients, through ``body`` (the
        backward body or the registered backward op)."""
        k = self.grad_outputs
        if len(grads) != k:  # a drop-in returns fewer outputs
            grads = grads[:k] + (None,) * (k - len(grads))
        out = [None] * self._n_inputs
        if not any(map(_given, grads)):
            return tuple(out)
        result = body(*grads, *ctx.saved_tensors, *ctx.flags)
        result = (result,) if isinstance(result, Tensor) else result
        for i, dtype, g in zip(self._grad_inputs, ctx.grad_dtypes, result):
            if dtype is not None:
                out[i] = g if g.dtype == dtype else g.to(dtype)
        return tuple(out)

    def _registered_backward(self, ctx, *grads):
        return self.backward(ctx, grads, self.backward_op)


def _once_differentiable(fn: Callable) -> Callable:
    """``torch.autograd.function.once_differentiable`` without its cost where it does
    nothing: the engine runs a backward with grad mode off unless ``create_graph``."""
    guarded = torch.autograd.function.once_differentiable(fn)

    def backward(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else fn(ctx, *grads)
    return backward


def _direct_function(boundary: Boundary) -> type[torch.autograd.Function]:
    """The bodies in a plain ``torch.autograd.Function``, ``apply(rest, *args)``: it
    returns the outputs that carry gradients and appends the others (the small tensors
    kept for the backward) to the list ``rest``, so that autograd wraps and tracks only
    the first (each output of a Function costs host time)."""
    k = boundary.grad_outputs

    class Direct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rest, *args):
            out = boundary.forward_body(*args)
            boundary.setup(ctx, args, out, all_returned=False)
            if isinstance(out, Tensor):
                rest.append(())
                return out
            rest.append(out[k:])
            return out[:k]

        @staticmethod
        @_once_differentiable
        def backward(ctx, *grads):
            return (None, *boundary.backward(ctx, grads, boundary.backward_body))

    return Direct


def drop_in_function(name: str, doc: str, prepare: Callable, outputs: int = 1,
                     grads: Callable | None = None) -> type[torch.autograd.Function]:
    """A public ``torch.autograd.Function`` on an op boundary's path: the bodies when
    ``eager_ok``, the registered ops otherwise (torch.compile traces those).

    ``prepare(ctx, *args) -> (boundary, op_args)`` checks the user's arguments and
    maps them to the op's; the Function returns the first ``outputs`` outputs, in
    the first argument's dtype. ``grads(ctx, op_grads) -> grads`` maps gradients of
    the op inputs to the user's arguments (default: position for position).
    """

    def forward(ctx, *args):
        boundary, op_args = prepare(ctx, *args)
        ctx.boundary, ctx.direct, ctx.n_args = boundary, boundary.eager(op_args), len(args)
        out = (boundary.forward_body if ctx.direct else boundary.op)(*op_args)
        boundary.setup(ctx, op_args, out, all_returned=False)
        out = out[:outputs] if isinstance(out, tuple) else (out,)
        dtype = args[0].dtype
        out = tuple(o if o.dtype == dtype else o.to(dtype) for o in out)
        return out[0] if outputs == 1 else out

    def backward(ctx, *out_grads):
        b = ctx.boundary
        op_grads = b.backward(ctx, out_grads, b.backward_body if ctx.direct else b.backward_op)
        out = tuple(grads(ctx, op_grads)) if grads else op_grads
        return (out + (None,) * ctx.n_args)[:ctx.n_args]

    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(forward),
        "backward": staticmethod(_once_differentiable(backward))})
