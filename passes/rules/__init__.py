"""Fusion rules as data: one family per module, run by :func:`foldcompile.passes.fuse.fuse_pass`.

A :class:`Rule` is a record — name, family, priority, and four functions:

    recognise(node, ctx) -> Candidate | Reject | None   does the math around ``node`` match?
    check(cand, ctx)     -> str | None                  a reason the kernel cannot take it (limits, dtypes)
    profitable(cand, ctx)-> str | None                  a reason it does not pay at the stated size
    replace(cand, ctx)   -> torch.fx.Node               rewrite the graph; returns the new output node

``recognise`` answers ``None`` when the node is not an anchor of the rule at all (a layer
norm is not an attention), and a :class:`Reject` when it is one whose surroundings do not
match exactly (an attention whose logits have a second user): the pass counts those, with
the reason, so a test can assert "matched 4 attentions, rejected 1". Families:

    attention   softmax(scale·q kᵀ + biases, masked) v [· sigmoid(gate)]  -> kernels.attention
                (attention_chunks: a chunk loop of one attention, concatenated -> one call)
    triangle_multiplication  sigmoid(lin(x)) · lin(LN(Σ_k a b)), a, b = mask · sigmoid(lin(x)) · lin(x),
                x = LN(z)                                               -> kernels.triangle_multiplication
    outer_product_mean  linear(flatten(Σ_s a ⊗ b)) / (eps + Σ_s m_a m_b)     -> kernels.outer_product_mean
    softmax     softmax(scale·x + bias, masked) left over                  -> kernels.softmax
    ln_multi_linear  layer_norm(x) feeding projections (q, k, v, gate, ...)  -> kernels.ln_linear
    layer_norm  layer_norm over the last dim, or written out by hand       -> kernels.layer_norm
    elementwise convex chains of element-wise ops of one shape             -> kernels.fuse_elementwise
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import sympy
import torch.fx

__all__ = ["Rule", "Candidate", "Reject", "Context", "all_rules"]


@dataclass
class Candidate:
    """A recognised pattern: the nodes it replaces (``region``, all removed after the rewrite
    except where other users keep them) and what the replacement needs (``parts``)."""

    rule: str
    anchor: torch.fx.Node
    region: list[torch.fx.Node]
    output: torch.fx.Node  # the node whose uses the replacement takes over
    parts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def site(self) -> str:
        from foldcompile.passes.rules._meta import site
        return site(self.anchor)


@dataclass
class Reject:
    """An anchor of a rule whose surroundings do not match exactly; left alone."""

    reason: str


@dataclass
class Context:
    """What rules may read besides the graph: the stated size for profitability."""

    gm: torch.fx.GraphModule
    subs: Mapping[sympy.Symbol, int]
    at: Mapping[str, int]
    # kernels may draw dropout masks themselves; not in a DAP rank's graph, whose random ops draw what one
    # process draws on torch's generator (foldcompile.distributed.sharded_random)
    kernel_random: bool = True


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    priority: int  # higher runs first: an attention's softmax must not be taken by the softmax rule
    recognise: Callable[[torch.fx.Node, Context], "Candidate | Reject | None"]
    check: Callable[[Candidate, Context], "str | None"]
    profitable: Callable[[Candidate, Context], "str | None"]
    replace: Callable[[Candidate, Context], torch.fx.Node]
    description: str = ""
    reverse: bool = False  # visit anchors last to first (groups grown from their sinks)


def all_rules() -> list[Rule]:
    """Every rule of every family, highest priority first."""
    from foldcompile.passes.rules import (attention, attention_chunks, elementwise, layer_norm, ln_multi_linear,
                                          outer_product_mean, softmax, triangle_multiplication)
    rules = [*attention_chunks.RULES, *attention.RULES, *triangle_multiplication.RULES, *outer_product_mean.RULES,
             *softmax.RULES, *ln_multi_linear.RULES, *layer_norm.RULES, *elementwise.RULES]
    return sorted(rules, key=lambda r: -r.priority)
