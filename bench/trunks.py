"""The models ``bench/optimize.py`` times, each with its inputs, precision and fp32 reference.

- ``evoformer_stack``, ``pairformer_stack``: the zoo's stacks (AF2 / AF3 dims), parameters and
  activations in bf16.
- ``boltz2_pairformer``: the UNMODIFIED Boltz-2 ``PairformerModule`` from the ``boltz`` package
  (2.2.1), at Boltz-2's own dims (:data:`BOLTZ2_DIMS`) and precision: Boltz-2 runs inference as
  "bf16-mixed" (``boltz.main``: ``precision="bf16-mixed"``): fp32 parameters, every call under
  ``torch.autocast(dtype=torch.bfloat16)``, its single track in fp32 inside its own
  ``autocast(enabled=False)`` region. Called with bf16 parameters and no autocast it raises
  (its triangle multiplication computes in fp32 and feeds that to its bf16 layers), so the
  bf16 rows are the autocast ones; its ``fp32`` rows are the same module without autocast.
  Boltz's output and gate layers start at zero; every parameter is redrawn at random (non-zero),
  as the zoo does, so every path shows in the error column.

``subject(name, case_spec, device, smoke)`` builds one; where a needed package is missing it raises
:class:`MissingPeer` (the benchmark records ``missing-peer: <what>`` for the row instead).

    >>> import torch
    >>> s = subject("pairformer_stack", dict(n_seq=128, n_res=1024, train=False), "cpu", smoke=True)
    >>> s.blocks, s.autocast, len(s.inputs)
    (1, None, 4)
    >>> tuple(s.reference(chunk=None).shape)     # tiny: N_res=11, c_s=16
    (11, 16)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from foldcompile.models import zoo

N_BLOCKS = 4
ZOO = ("evoformer_stack", "pairformer_stack")
BOLTZ = "boltz2_pairformer"
MODELS = ZOO + (BOLTZ,)
# the rows (bench.optimize.VARIANTS) each model has
ZOO_VARIANTS = ("eager", "eager chunked", "torch.compile", "torch.compile reduce-overhead", "optimize eager",
                "optimize cuda_graph", "optimize inductor", "backend foldcompile")
BOLTZ_VARIANTS = ("eager", "boltz cuequivariance", "torch.compile", "torch.compile reduce-overhead",
                  "optimize eager", "optimize cuda_graph", "optimize inductor", "eager fp32",
                  "optimize cuda_graph fp32")
BOLTZ_VERSION = "2.2.1"
# Boltz-2's Pairformer: token dims of the Boltz-2 checkpoint (the trunk's token_s / token_z, as the
# diffusion and encoder modules' defaults of boltz 2.2.1 spell them: 384 / 128) and boltz.main's
# PairformerArgsV2 (num_heads 16, v2 attention; pairwise head width 32 and 4 pairwise heads are
# PairformerModule's defaults, which Boltz-2 does not override)
BOLTZ2_DIMS = dict(token_s=384, token_z=128, num_heads=16, pairwise_head_width=32, pairwise_num_heads=4)
BOLTZ2_TINY = dict(token_s=16, token_z=16, num_heads=2, pairwise_head_width=8, pairwise_num_heads=2)


class MissingPeer(RuntimeError):
    """A package a row needs is not importable here: its row says so instead of failing."""


@dataclass
class Subject:
    """One model at one case: ``module(*inputs, **kwargs)`` is a call the benchmark times."""

    name: str
    module: torch.nn.Module
    inputs: tuple
    blocks: int
    device: str
    autocast: torch.dtype | None = None  # every call under torch.autocast(device, dtype): Boltz-2's bf16-mixed
    chunk_kwarg: str | None = None       # the model's own inference chunking keyword (the zoo's chunk_size)
    variants: tuple[str, ...] = ()       # the rows this model has (bench.optimize.VARIANTS that apply)
    extra: dict[str, Any] = field(default_factory=dict)
    _reference: Callable[[int | None], torch.Tensor] | None = None

    def precision(self, fp32: bool = False) -> contextlib.AbstractContextManager:
        """The context every call of a row runs in: the subject's autocast, or none for its fp32 rows."""
        if self.autocast is None or fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.autocast)

    def fp32_inputs(self) -> tuple:
        return tuple(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in self.inputs)

    def reference(self, chunk: int | None) -> torch.Tensor:
        """The first output in fp32 on the same parameters and inputs (eval, no_grad, no autocast); ``chunk``:
        the model's own inference chunking, where it has one (the same function in less memory)."""
        assert self._reference is not None
        with torch.no_grad():
            return self._reference(chunk)


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _zoo_subject(name: str, spec: dict, device: str, smoke: bool) -> Subject:
    sized = dict(size="tiny", n_blocks=1) if smoke else \
        dict(size="af2", n_seq=spec["n_seq"], n_res=spec["n_res"], n_blocks=N_BLOCKS)
    torch.manual_seed(0)
    module, inputs = zoo.get(name, device=device, dtype=torch.float32 if smoke else torch.bfloat16, **sized)
    module.train(spec["train"])

    def reference(chunk: int | None) -> torch.Tensor:
        ref = zoo.get(name, device=device, dtype=torch.float32, **sized)[0].eval()
        ref.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        kwargs = {} if chunk is None else {"chunk_size": chunk}
        out = _first(ref(*[x.float() if x.is_floating_point() else x for x in inputs], **kwargs)).float()
        del ref
        return out

    return Subject(name, module, inputs, sized["n_blocks"], device, chunk_kwarg="chunk_size",
                   variants=ZOO_VARIANTS,
                   _reference=reference)


def boltz_pairformer_module():
    """``boltz.model.layers.pairformer`` of boltz 2.2.1, or :class:`MissingPeer` saying what is missing."""
    try:
        module = importlib.import_module("boltz.model.layers.pairformer")
        version = importlib.metadata.version("boltz")
    except Exception as e:  # noqa: BLE001 - any import failure: the peer is not usable here
        raise MissingPeer(f"boltz=={BOLTZ_VERSION} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "carry .peers (bench/peers.py) and put /tmp/peers on PYTHONPATH") from e
    if version != BOLTZ_VERSION:
        raise MissingPeer(f"boltz=={BOLTZ_VERSION} (boltz {version} is installed)")
    return module


def cuequivariance_kernels(device: str) -> None:
    """Raise :class:`MissingPeer` unless Boltz-2's ``use_kernels=True`` path can run here: the
    cuEquivariance torch package, its CUDA ops, and a CUDA device."""
    missing = []
    for package in ("cuequivariance_torch", "cuequivariance_ops_torch"):
        try:
            importlib.import_module(package)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{package} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    if missing:
        raise MissingPeer(", ".join(missing) + "; carry .peers (bench/peers.py)")
    if device != "cuda":
        raise MissingPeer("cuEquivariance's kernels need a CUDA device")


def _boltz_subject(spec: dict, device: str, smoke: bool) -> Subject:
    pf = boltz_pairformer_module()
    dims = BOLTZ2_TINY if smoke else BOLTZ2_DIMS
    blocks = 1 if smoke else N_BLOCKS
    n = 13 if smoke else spec["n_res"]
    torch.manual_seed(0)
    module = pf.PairformerModule(dims["token_s"], dims["token_z"], num_blocks=blocks, num_heads=dims["num_heads"],
                                 dropout=0.0, pairwise_head_width=dims["pairwise_head_width"],
                                 pairwise_num_heads=dims["pairwise_num_heads"], post_layer_norm=False,
                                 activation_checkpointing=False, v2=True)
    zoo.randomize_parameters(module, seed=0)
    module = module.to(device).train(spec["train"])
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(1, n, dims["token_s"], generator=gen)
    # the pair stream in bf16 as Boltz-2's autocast leaves it (its linears' outputs); the single stream
    # and the masks in fp32 (the module casts s to fp32 itself)
    z = torch.randn(1, n, n, dims["token_z"], generator=gen).to(torch.bfloat16)
    mask = torch.ones(1, n)
    if n >= 3:
        mask[:, -1] = 0.0  # a padded token
    pair_mask = mask[:, :, None] * mask[:, None, :]
    inputs = tuple(x.to(device) for x in (s, z, mask, pair_mask))

    def reference(chunk: int | None) -> torch.Tensor:  # Boltz chunks its triangle attention itself in eval
        return _first(module(*[x.float() for x in inputs])).float()

    return Subject(BOLTZ, module, inputs, blocks, device, autocast=torch.bfloat16,
                   variants=BOLTZ_VARIANTS,
                   extra=dict(dims=dims), _reference=reference)


def has_row(name: str, case_train: bool, variant: str) -> bool:
    """Whether model ``name`` has the row ``variant`` in a case (train or not): Boltz-2 infers only, and
    the models' own chunking is an inference option."""
    if name == BOLTZ:
        return not case_train and variant in BOLTZ_VARIANTS
    return variant in ZOO_VARIANTS and not (case_train and variant == "eager chunked")


def subject(name: str, spec: dict, device: str, smoke: bool = False) -> Subject:
    """The model ``name`` (one of :data:`MODELS`) at the case ``spec`` (``n_seq``, ``n_res``, ``train``).

    ``smoke``: one block at tiny dims and sizes on the CPU (the script's code paths, not a benchmark)."""
    if name in ZOO:
        return _zoo_subject(name, spec, device, smoke)
    if name == BOLTZ:
        if spec["train"]:
            raise ValueError(f"{BOLTZ}: inference cases only (Boltz-2's training needs its checkpointing)")
        return _boltz_subject(spec, device, smoke)
    raise KeyError(f"unknown benchmark model {name!r}; valid: {', '.join(MODELS)}")
