"""Mixed op with binary gates: path-level binarization and the architecture-gradient estimators.

ProxylessNAS (https://arxiv.org/abs/1812.00332, Sec. 3.2): every mixed layer holds logits ``alpha`` over its
candidates; binary gates sampled from softmax(alpha) keep ONE path active, so a weight step costs one path of
memory. Architecture gradients, chosen by :class:`GateMode` (an argument, never a global):

* ``two``: sample two paths, run both (the inactive one without a graph), take the BinaryConnect gradient
  ``dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i)`` over the pair, then shift the pair's logits so the
  unsampled paths keep their probabilities (the paper's memory-saving mode).
* ``full_v2``: only the active path runs forward; in backward every other candidate is re-run without a graph to
  get ``dL/dg_k = <o_k, dL/dout>``, costing time but no stored activations.
* ``reinforce``: the score-function estimator ``-(R - b) grad log p(path)`` with a moving-average baseline ``b``,
  for rewards that are not differentiable.

Candidate weights (:class:`WeightSharing`): ``separate`` gives every candidate its own weights (the paper);
``nested`` holds all MBConv candidates of a layer in one :class:`~proxyless_ray.nn.ops.ElasticMBConv` (smaller kernels
are the centre of the largest, smaller expansions its first channels), so every step trains weights that all
candidates use. Either way one candidate runs per path.

Zero-op semantics follow the paper's code: when zero is the active path the layer is skipped (the block returns
its input) and the layer's alpha gets no gradient on that step. That makes zero self-reinforcing: the likelier zero
is, the more often its layer escapes the loss's judgement while the latency term keeps pushing towards it. With
``zero_gradient`` on, an architecture step whose active path is zero still reads the other sampled candidates'
gate gradients (their outputs, run without a graph, times the gradient at the layer's output), so the loss can argue
for keeping the layer; the forward output is unchanged (the zero path's, plus the shortcut).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from proxyless_ray.choices import GateMode
from proxyless_ray.nn.arch import ZERO, parse_block
from proxyless_ray.nn.ops import CandidateView, ElasticMBConv, build_op


class WeightSharing(str, Enum):
    """Whether the candidates of a mixed layer hold their own weights or share one elastic set."""

    SEPARATE = "separate"  # the paper: one set of weights per candidate
    NESTED = "nested"  # Single-Path NAS / Once-for-All: kernels and expansions nested in the largest candidate


class Forward(str, Enum):
    """What a mixed op computes on its next forward (set by the supernet before each step)."""

    SINGLE = "single"  # weight step / eval: the active path only
    TWO = "two"  # arch step, two sampled paths with gates
    FULL_V2 = "full_v2"  # arch step, active path forward, all gate gradients in backward
    ALL = "all"  # DARTS-style weighted sum of every path (benchmark baseline, not used by the search)


class MixedOp(nn.Module):
    """Candidate ops of one layer plus their architecture logits ``alpha``.

    Args:
        candidates: Block strings, e.g. from :func:`proxyless_ray.nn.space.candidate_blocks`.
        in_chs: Input channels.
        sharing: Separate weights per candidate, or all MBConv candidates nested in one elastic op.
    """

    def __init__(self, candidates: Sequence[str], in_chs: int,
                 sharing: WeightSharing | str = WeightSharing.SEPARATE):
        super().__init__()
        if len(candidates) < 1:
            raise ValueError("a mixed op needs at least one candidate")
        self.candidates = tuple(candidates)
        specs = [parse_block(c) for c in self.candidates]
        for spec, text in zip(specs, self.candidates):
            if spec.kind == "conv":
                raise ValueError(f"candidate {text!r} is a plain conv; mixed ops take MBConv or zero candidates")
        real = [s for s in specs if not s.is_zero]
        if ZERO in self.candidates and any(s.stride != 1 or s.out_chs != in_chs for s in real):
            raise ValueError(
                f"zero op requested on a layer with candidates {list(self.candidates)} and {in_chs} input channels; "
                f"zero is only allowed where stride is 1 and in_chs == out_chs"
            )
        self.in_chs = in_chs
        self.sharing = WeightSharing(sharing)
        self.elastic: ElasticMBConv | None = None
        if self.sharing == WeightSharing.NESTED and real:
            if len({(s.out_chs, s.stride) for s in real}) != 1:
                raise ValueError(f"nested weight sharing needs candidates of one width and stride, got "
                                 f"{list(self.candidates)}")
            self.elastic = ElasticMBConv(in_chs, real[0].out_chs, real[0].stride,
                                         tuple(sorted({s.kernel_size for s in real})),
                                         tuple(sorted({s.exp_ratio for s in real})))
            # views, not modules: the weights live once, in the elastic op
            self.ops: Sequence = [build_op(s, in_chs) if s.is_zero else CandidateView(self.elastic, s.kernel_size,
                                                                                       s.exp_ratio) for s in specs]
        else:
            self.ops = nn.ModuleList([build_op(s, in_chs) for s in specs])
        self.alpha = nn.Parameter(torch.zeros(len(self.candidates)))
        self.zero_index = self.candidates.index(ZERO) if ZERO in self.candidates else -1
        self.active = 0  # index of the active path
        self.pair: tuple[int, int] = (0, 0)  # (active, inactive) in two mode
        self.pair_alpha_before: tuple[float, float] = (0.0, 0.0)
        self.forward_mode = Forward.SINGLE
        self.zero_gradient = False  # architecture gradient also when zero is the active path (module docstring)
        self.gates: torch.Tensor | None = None  # binary gates of the last arch forward, with their grad

    # -- sampling ----------------------------------------------------------------------------------------------

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def sample_single(self, generator: torch.Generator) -> int:
        """Sample one active path from softmax(alpha) (weight steps, full_v2 and reinforce arch steps)."""
        with torch.no_grad():
            self.active = int(torch.multinomial(self.probs(), 1, generator=generator))
        return self.active

    def sample_two(self, generator: torch.Generator) -> tuple[int, int]:
        """Sample two distinct paths from softmax(alpha), then which of them is active from the pair's softmax."""
        with torch.no_grad():
            if len(self.candidates) == 1:
                self.pair = (0, 0)
            else:
                idx = torch.multinomial(self.probs(), 2, replacement=False, generator=generator).tolist()
                pair_p = torch.softmax(self.alpha[idx], dim=0)
                c = int(torch.multinomial(pair_p, 1, generator=generator))
                self.pair = (idx[c], idx[1 - c])
            self.active = self.pair[0]
            self.pair_alpha_before = (float(self.alpha[self.pair[0]]), float(self.alpha[self.pair[1]]))
        return self.pair

    def set_argmax(self) -> int:
        self.active = int(torch.argmax(self.alpha.detach()))
        return self.active

    @property
    def active_is_zero(self) -> bool:
        return self.active == self.zero_index

    @property
    def skips_layer(self) -> bool:
        """The block returns its input without running the op (zero active, and no gate gradient wanted)."""
        if self.forward_mode == Forward.ALL or not self.active_is_zero:
            return False
        return self.forward_mode == Forward.SINGLE or not self.zero_gradient

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.forward_mode
        if mode == Forward.SINGLE:
            return self.ops[self.active](x)
        if mode == Forward.ALL:
            p = self.probs()
            return sum(p[i] * op(x) for i, op in enumerate(self.ops))
        n = len(self.candidates)
        gates = torch.zeros(n, device=x.device, dtype=x.dtype)
        gates[self.active] = 1.0
        gates.requires_grad_(True)
        self.gates = gates
        if mode == Forward.TWO:
            active, inactive = self.pair
            out = gates[active] * self.ops[active](x)
            if inactive != active and inactive != self.zero_index:  # zero's output and gate gradient are 0
                with torch.no_grad():  # only its output is needed, for dL/dg_inactive = <o, grad_out>
                    other = self.ops[inactive](x)
                out = out + gates[inactive] * other
            return out
        return _FullV2Gate.apply(x, gates, self)

    # -- architecture gradients --------------------------------------------------------------------------------

    def set_alpha_grad_from_gates(self, mode: GateMode) -> None:
        """Turn the gates' gradient into alpha's gradient (BinaryConnect rule); see the module docstring."""
        if (self.active_is_zero and not self.zero_gradient) or self.gates is None or self.gates.grad is None:
            self.alpha.grad = None  # paper: zero active -> layer skipped, no architecture gradient this step
            self.gates = None
            return
        g = self.gates.grad.detach()
        alpha = self.alpha.detach()
        grad = torch.zeros_like(alpha)
        if mode == GateMode.TWO:
            idx = list(self.pair)
            if idx[0] != idx[1]:
                p = torch.softmax(alpha[idx], dim=0)
                sub = binary_connect_grad(g[idx], p)
                grad[idx] = sub
        else:
            grad = binary_connect_grad(g, torch.softmax(alpha, dim=0))
        self.alpha.grad = grad if self.alpha.grad is None else self.alpha.grad + grad
        self.gates = None

    def rescale_pair(self) -> None:
        """After a ``two`` arch update, shift the pair's logits so every unsampled path keeps its probability."""
        a, b = self.pair
        if a == b:
            return
        with torch.no_grad():
            old = self.pair_alpha_before
            new = (float(self.alpha[a]), float(self.alpha[b]))
            offset = _logsumexp(new) - _logsumexp(old)
            self.alpha[a] -= offset
            self.alpha[b] -= offset

    def set_reinforce_grad(self, advantage: float) -> None:
        """alpha.grad += -(R - b) * d log p(active) / d alpha = -(R - b) (onehot(active) - p)."""
        with torch.no_grad():
            grad = reinforce_grad(self.alpha.detach(), self.active, advantage)
        self.alpha.grad = grad if self.alpha.grad is None else self.alpha.grad + grad


def binary_connect_grad(gate_grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``dL/dalpha_i = sum_j dL/dg_j * p_j * (delta_ij - p_i)`` (ProxylessNAS eq. 4)."""
    weighted = gate_grad * probs  # [j]
    return weighted - probs * weighted.sum()


def reinforce_grad(alpha: torch.Tensor, sampled: int, advantage: float) -> torch.Tensor:
    """Score-function gradient of the loss ``-R`` for one sampled path: ``-(R - b) (onehot - softmax(alpha))``."""
    p = torch.softmax(alpha, dim=0)
    onehot = torch.zeros_like(p)
    onehot[sampled] = 1.0
    return -advantage * (onehot - p)


def _logsumexp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


class _FullV2Gate(torch.autograd.Function):
    """Active path forward; backward re-runs the other candidates without a graph for their gate gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gates: torch.Tensor, mixed: MixedOp) -> torch.Tensor:  # type: ignore[override]
        detached = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = mixed.ops[mixed.active](detached)
        ctx.mixed = mixed
        ctx.save_for_backward(detached, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        detached, out = ctx.saved_tensors
        mixed: MixedOp = ctx.mixed
        grad_x = None
        if detached.requires_grad:
            (grad_x,) = torch.autograd.grad(out, detached, grad_out, retain_graph=False)
        gate_grad = torch.zeros(len(mixed.candidates), dtype=grad_out.dtype, device=grad_out.device)
        # zero's output is 0, so its gate gradient is 0
        others = [k for k in range(len(mixed.ops)) if k not in (mixed.active, mixed.zero_index)]
        with torch.no_grad():
            if mixed.elastic is not None and others:  # nested weights: the candidates share most of their work
                views = [mixed.ops[k] for k in others]
                outs = mixed.elastic.candidate_outputs(detached.detach(), [(v.kernel_size, v.exp_ratio)
                                                                           for v in views])
            else:
                outs = [mixed.ops[k](detached.detach()) for k in others]
            for k, o_k in zip(others, outs):
                gate_grad[k] = (o_k * grad_out).sum()
            if mixed.active != mixed.zero_index:
                gate_grad[mixed.active] = (out.detach() * grad_out).sum()
        return grad_x, gate_grad, None
