"""The kernels as torch.library ops (kernels/ops.py): registration checked by torch.library.opcheck
(schema, fake implementation against the real one, autograd registration), results and gradients
against the kernels' float64 references."""
import pytest
import torch

import foldcompile.kernels.ops  # noqa: F401
from foldcompile.kernels.attention import attention_reference
from foldcompile.kernels.layer_norm import layer_norm_reference
from foldcompile.kernels.softmax import softmax_reference

K = torch.ops.foldcompile


def _r(*shape, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), requires_grad=grad)


CASES = [
    ("attention", K.attention.default, (_r(2, 3, 37, 8), _r(2, 3, 29, 8), _r(2, 3, 29, 8), _r(1, 3, 37, 29)),
     lambda q, k, v, b: attention_reference(q, k, v, bias=b)),
    ("layer_norm", K.layer_norm.default, (_r(5, 61), _r(61), _r(61), 1e-5),
     lambda x, w, b, eps: layer_norm_reference(x, w, b, eps)),
    ("softmax", K.softmax.default, (_r(7, 37), -1, 0.5, _r(1, 37)),
     lambda x, dim, scale, b: softmax_reference(x, dim, scale=scale, bias=b)),
]


@pytest.mark.parametrize("name,op,args,ref", CASES, ids=[c[0] for c in CASES])
def test_op_registration(name, op, args, ref):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("name,op,args,ref", CASES, ids=[c[0] for c in CASES])
def test_op_matches_the_reference_with_gradients(name, op, args, ref):
    out = op(*args)
    ref_args = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    want = ref(*ref_args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    want.backward(g.double())
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
    for a, r in zip(args, ref_args):
        if isinstance(a, torch.Tensor):
            assert a.grad is not None
            assert ((a.grad.double() - r.grad).norm() / r.grad.norm()).item() < 1e-5
            a.grad = None


@pytest.mark.parametrize("name,op,args,ref", CASES, ids=[c[0] for c in CASES])
def test_op_differentiated_by_aot_autograd(name, op, args, ref):
    """Under torch.compile (AOTAutograd tracing forward and backward on fake tensors) the op and its
    backward op stay opaque: the same values and gradients as eager, with no graph break."""
    torch._dynamo.reset()

    def f(*a):
        return op(*a) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*args)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    got_grads = torch.autograd.grad(got, leaves, g)
    want = f(*args)
    want_grads = torch.autograd.grad(want, leaves, g)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op,args", [
    (K.attention_backward.default, (_r(2, 3, 37, 8, grad=False), _r(2, 3, 37, 8), _r(2, 3, 29, 8), _r(2, 3, 29, 8),
                                    _r(1, 3, 37, 29), None, None, None, None, [True, True, True, True, False, False,
                                                                               False])),
    (K.layer_norm_backward.default, (_r(5, 61, grad=False), _r(5, 61), _r(61), None, 1e-5, [True, True, False])),
    (K.softmax_backward.default, (_r(7, 37, grad=False), _r(7, 37), -1, 0.5, _r(1, 37), None, [True, False, False])),
], ids=["attention_backward", "layer_norm_backward", "softmax_backward"])
def test_backward_op_registration(op, args):
    """The backward ops' fake implementations agree with the real ones (shapes, dtypes, strides), and an
    unneeded or absent slot is an empty tensor."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    out = op(*args)
    needs = args[-1]
    assert [t.numel() > 0 for t in out] == list(needs)
