"""``torch.ops.foldcompile.triangle_multiplication`` (kernels/ops.py): registration checked by
torch.library.opcheck (schema, fake implementation against the real one, autograd registration), values
and every gradient against the zoo module, the backward op's fake implementation, and the op under
AOTAutograd (torch.compile traces forward and backward on fake tensors; the op stays opaque)."""
import pytest
import torch

from foldcompile.kernels.ops import TRIANGLE_MULTIPLICATION_PARAMS
from foldcompile.kernels.triangle_multiplication import params_from_module
from foldcompile.models import pairformer as pf
from foldcompile.models.alphafold2.triangle import TriangleMultiplicativeUpdate
from foldcompile.models.zoo import randomize_parameters

K = torch.ops.foldcompile


def _case(kind: str):
    """(module, op arguments): AF2's incoming update (biases, AF2's swapped orientation) or the
    Pairformer's outgoing one (no biases: None slots), z [2, 9, 9, 8] and a mask with an empty row."""
    module = TriangleMultiplicativeUpdate(8, 4, outgoing=False) if kind == "af2" else pf.TriangleMultiplication(8, 4)
    module = randomize_parameters(module, 0)
    params, outgoing = params_from_module(module)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 9, 9, 8, generator=g, requires_grad=True)
    mask = (torch.rand(2, 9, 9, generator=g) > 0.2).float()
    mask[:, 1] = 0.0
    args = (z, mask, *[getattr(params, n) for n in TRIANGLE_MULTIPLICATION_PARAMS], params.eps_in, params.eps_out,
            outgoing)
    return module, args


@pytest.mark.parametrize("kind", ["af2", "pairformer"])
def test_op_registration_values_and_gradients(kind):
    module, args = _case(kind)
    op = K.triangle_multiplication.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    z, mask = args[:2]
    out = op(*args)
    ref = module(z, mask)
    leaves = [z, *module.parameters()]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got, want = torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_backward_op_fake_matches_and_leaves_unneeded_slots_empty():
    _, args = _case("pairformer")
    z, mask, *rest = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    grad = torch.randn(z.shape)
    # z, then the 16 parameters: the weights and the layer-norm affines wanted, the (absent) biases not
    needs = [True] + [True] * 6 + [False] * 6 + [True, False, True, True]
    bargs = (grad, z, mask, *rest, needs)
    op = K.triangle_multiplication_backward.default
    torch.library.opcheck(op, bargs, test_utils=("test_schema", "test_faketensor"))
    out = op(*bargs)
    assert [t.numel() > 0 for t in out] == needs


def test_op_differentiated_by_aot_autograd():
    _, args = _case("af2")
    torch._dynamo.reset()

    def f(*a):
        return K.triangle_multiplication.default(*a) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = compiled(*args)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    got_grads = torch.autograd.grad(got, leaves, g)
    want = f(*args)
    want_grads = torch.autograd.grad(want, leaves, g)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
