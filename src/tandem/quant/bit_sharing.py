"""SBS's quantizer (methods.md §5.2) and single-path bit sharing (§5.3).

`SBSWeight` / `SBSAct` are the plain §5.2 quantizers at a fixed bit width (quantizer `sbs`):
weights standardised with detached statistics, z = (clip(w^/|alpha|, -1, 1) + 1) / 2,
w_q = |alpha| (2 Q_b(z) - 1); inputs z = clip(x/|alpha|, 0, 1), x_q = |alpha| Q_b(z); alpha
learnable, initialised to 1; Q_b(z) = round(z (2^b - 1)) / (2^b - 1) with a straight-through
round.

`search_(quantizer, bits)` turns one into a bit-sharing quantizer over candidate bits
b_1 < ... < b_K (each dividing the next, so each coarse grid lies in the finer one), whose
output is Q_b1(z) + sum_j (prod_{i<=j} g_i) s_j with r_j = z - (Q_b1(z) + s_1 + ... + s_(j-1)),
s_j = Q_b(j+1)(r_j) and gates g_j = 1[mean|r_j| > t_j] (t_j >= 0, learnable, initialised to 0:
all open = the highest candidate). `shared()` writes that sum out. Because the grids nest,
Q_b1(z) + s_1 + ... + s_j = Q_b(j+1)(z) exactly, so r_j = z - Q_bj(z) and
s_j = Q_b(j+1)(z) - Q_bj(z): the search quantizers compute one rounding per candidate and one
output at the chosen width, in one autograd node each (a search step costs 1.5x an LSQ step,
benchmarks/sbs_step.py). `freeze_()` keeps the chosen width and drops the gates.

The functions at the end are what a search on a whole model asks of these quantizers (which
layers take part, their expected widths, the thresholds, freezing), so a method composes them
without looking inside (methods/sbs.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import TandemError
from ..ste import round_ste, threshold_ste
from .layers import QUANT_LAYERS
from .quantizers import PACTAct, WeightQuantizer, _grad_where_above
from .registry import register_quantizer


def check_candidates(bits) -> list[int]:
    """Sorted candidate bits; each in 1..8 and dividing the next (methods.md §5.3: otherwise the
    decomposition is not exact, e.g. {2, 3, 4})."""
    bits = sorted(int(b) for b in bits)
    if not bits or len(set(bits)) != len(bits) or any(not 1 <= b <= 8 for b in bits):
        raise TandemError(f"candidate bits {bits}: give distinct widths in 1..8")
    for lo, hi in zip(bits, bits[1:]):
        if hi % lo:
            raise TandemError(f"candidate bits {bits}: {lo} does not divide {hi}, so the {lo}-bit grid is not part "
                              f"of the {hi}-bit grid and bit sharing would not be exact (methods.md §5.3); "
                              f"use e.g. [2, 4, 8]")
    return bits


def q_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    n = 2 ** bits - 1
    return round_ste(z * n) / n


class BitGates(nn.Module):
    """Thresholds t_j of one quantizer's bit gates (optimiser category `gate`: no weight decay
    when the method says so), and running means of the residuals (`running_means`, updated in
    training mode with `momentum` as BatchNorm's statistics; saved with the model) for gates
    that decide from them instead of from one batch."""
    param_category = "gate"

    def __init__(self, k: int, momentum: float = 0.1):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(k))
        self.momentum = momentum
        self.register_buffer("running_means", torch.zeros(k))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))   # training batches folded in

    def forward(self, residual: torch.Tensor, j: int) -> torch.Tensor:
        return threshold_ste(residual.abs().mean(), self.threshold[j])

    @torch.no_grad()
    def running(self, means: list[torch.Tensor]) -> list[torch.Tensor]:
        """The residual means the gates decide from: in training mode this batch's folded into
        the running means (the first batch sets them); in eval mode the running means (this
        batch's before any training batch)."""
        batch = torch.stack(list(means))
        if self.training:
            if self.seen == 0:
                self.running_means.copy_(batch)
            else:
                self.running_means.lerp_(batch, self.momentum)
            self.seen += 1
        elif self.seen == 0:
            return list(batch)
        return list(self.running_means.clone())


@torch.no_grad()
def residual_means(c: torch.Tensor, bits: list[int], scale: float = 1.0) -> list[torch.Tensor]:
    """mean|r_j| for each gate, z = c / scale. The grids nest, so the residual after the first
    j terms is r_j = z - Q_bj(z): one rounding per gate, not the chain (and no gradient: under
    the straight-through round r_j has none to z)."""
    out = []
    for b in bits[:-1]:
        n = 2 ** b - 1
        u = c * (n / scale)
        out.append(u.sub_(torch.round(u)).abs_().mean() / n)
    return out


def step_dots(g: torch.Tensor, c: torch.Tensor, bits: list[int], scale: float = 1.0) -> torch.Tensor:
    """<g, s_j> for each gate, z = c / scale: s_j = Q_b(j+1)(z) - Q_bj(z) (nested grids), so
    the K dot products <g, Q_b(z)> give all K-1 (the gate products' gradients)."""
    g = g.flatten()
    dots = torch.stack([torch.dot(g, torch.round(c * ((2 ** b - 1) / scale)).flatten()) / (2 ** b - 1)
                        for b in bits])
    return dots[1:] - dots[:-1]


def shared(z: torch.Tensor, bits: list[int], gates: BitGates | None) -> torch.Tensor:
    """The single-path decomposition written out, Q_b1(z) + sum_j (prod_{i<=j} g_i) s_j
    (gates None: all open), with autograd through every term: the reference `_SharedUnit`'s
    one-node forward and backward are tested against."""
    q = q_unit(z, bits[0])
    out, keep = q, 1.0
    for j, b in enumerate(bits[1:]):
        r = z - q
        s = q_unit(r, b)
        if gates is not None:
            keep = keep * gates(r, j)
        out, q = out + keep * s, q + s
    return out


class _SharedUnit(torch.autograd.Function):
    """The bit-sharing quantizer on z in [0, 1] as one autograd node, so a search step keeps one
    tensor (z) per layer instead of every term of the decomposition: forward Q_b(z) at the
    width the hard gates chose (bit for bit the frozen quantizer); backward the decomposition's
    gradient under the straight-through round: identity to z, and <grad, s_k> to the cumulative
    gate product P_k (s_k = Q_b(k+1)(z) - Q_bk(z), recomputed from z)."""

    @staticmethod
    def forward(ctx, z, products, bits, hard):
        ctx.save_for_backward(z)
        ctx.bits = bits
        n = 2 ** hard - 1
        return torch.round(z * n) / n

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g, step_dots(g, z, ctx.bits), None, None


class _SharedAct(torch.autograd.Function):
    """An input's bit-sharing quantizer as one node: forward PACT's grid at the hard width
    (bit for bit the frozen SBSAct), backward PACT's gradients to x and alpha, and
    alpha <grad, s_k> to the gate products (s_k from z = clip(x, 0, alpha) / alpha)."""

    @staticmethod
    def forward(ctx, x, alpha, products, bits, hard):
        a = alpha.detach().abs().clamp_min(1e-8)
        a_below = torch.nextafter(a, a.new_tensor(-math.inf))
        if not x.is_cuda:
            a, a_below = float(a), float(a_below)
        c = torch.clamp(x, 0, a)
        ctx.save_for_backward(c)
        ctx.a, ctx.a_below, ctx.bits, ctx.shape = a, a_below, bits, alpha.shape
        step = a / (2 ** hard - 1)
        return torch.div(c, step).round_().mul_(step)

    @staticmethod
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        above = _grad_where_above(g, c, ctx.a_below)     # g where x >= alpha
        passed = _grad_where_above(g, c, 0.0) - above     # g where 0 < x < alpha
        grad_p = step_dots(g, c, ctx.bits, ctx.a) * ctx.a
        return passed, above.sum().reshape(ctx.shape), grad_p, None, None


class _BitSharing:
    """What both sides share: candidate bits, gates, the hard choice, freezing. (No class-level
    `gates` default: it would hide the registered submodule from nn.Module's lookup.)"""

    def _init_sharing(self) -> None:
        self.candidates, self.gates, self.products, self.last_means = None, None, [], None
        self.from_running = False

    def start_search(self, bits, from_running: bool = False) -> None:
        """Search over `bits`; `from_running`: the gates decide from running means of the
        residuals (inputs: a batch's residuals vary, so a per-batch choice flips between widths)."""
        self.candidates = check_candidates(bits)
        self.gates = BitGates(len(self.candidates) - 1).to(self.alpha.device)
        self.gates.train(self.training)
        self.bits = self.candidates[-1]
        self.from_running = from_running
        self.products: list = []   # this forward's cumulative gate products (expected_bits)

    def expected_bits(self) -> torch.Tensor | float:
        """b_1 + sum_j (prod_{i<=j} g_i)(b_(j+1) - b_j): the width the hard gates chose, with
        the gates' straight-through gradient (from the last forward pass)."""
        if self.candidates is None:
            return float(self.bits)
        if not self.products:
            raise TandemError("expected_bits needs a forward pass of the searching model first")
        c = self.candidates
        return c[0] + sum(p * (c[j + 1] - c[j]) for j, p in enumerate(self.products))

    def freeze_(self, bits: int) -> None:
        """Search over: keep `bits`, drop the gates."""
        self.bits, self.candidates, self.gates, self.products = bits, None, None, []
        self.from_running = False

    def _gate_products(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """P_k = prod_{i<=k} g_i, g_i = 1[mean|r_i| > t_i] with the sigmoid gradient to t_i,
        and the width they choose."""
        keep, out = None, []
        means = residual_means(z.detach(), self.candidates)
        self.last_means = self.gates.running(means) if self.from_running else means   # what the bits come from
        for j, m in enumerate(self.last_means):
            g = threshold_ste(m, self.gates.threshold[j])
            keep = g if keep is None else keep * g
            out.append(keep)
        self.products = out
        products = torch.stack(out)
        return products, self._width(products.detach().gt(0.5).tolist())

    def _width(self, open_) -> int:
        """b_1 if gate 1 is closed, b_2 if gate 1 is open and gate 2 closed, ..., b_K if all open."""
        for j, is_open in enumerate(open_):
            if not is_open:
                return self.candidates[j]
        return self.candidates[-1]

    def _quantize_unit(self, z):
        if self.candidates is None:
            return q_unit(z, self.bits)
        products, width = self._gate_products(z)
        return _SharedUnit.apply(z, products, self.candidates, width)

    @torch.no_grad()
    def chosen_bits(self, means) -> int:
        """The width the hard gates select for residual means `means`."""
        if self.candidates is None:
            return self.bits
        return self._width((torch.stack(list(means)) > self.gates.threshold).tolist())


class SBSWeight(_BitSharing, WeightQuantizer):
    kind = "sbs"
    zero_in_grid = False    # alpha (2 Q(z) - 1): odd multiples of alpha / (2^b - 1)

    def __init__(self, bits, per_channel=False, channels=1, clip_percentile: float | None = None,
                 restore_scale: bool = True):
        super().__init__(bits, per_channel, channels)
        if per_channel:
            raise TandemError("the sbs quantizer is per tensor (one alpha per layer); set per_channel=false")
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.clip_percentile = clip_percentile
        self.restore_scale = restore_scale
        self._init_sharing()
        self.kept_by = None   # callables giving the kept entries along an axis (SBS's channel gates)
        self.set_flags(calibrated=True)

    @classmethod
    def from_spec(cls, bits, layer, spec):
        return cls(bits, spec.per_channel, layer.weight.shape[0], clip_percentile=spec.clip_percentile(),
                   restore_scale=spec.sbs_weight_scale == "restored")

    @torch.no_grad()
    def calibrate_weight(self, w):
        """clip_percentile: alpha starts at that percentile of |w^| (the standardised weights, in
        units of their std); None: at 1, the code's start, which clips 8-bit weights at 1 std."""
        if self.clip_percentile is not None:
            from .observers import percentile_range
            mean, std = self._stats(w)
            w_hat = (w - mean) / std
            self.alpha.fill_(max(float(percentile_range(w_hat.abs(), self.clip_percentile)[1]), 1e-3))
        self.set_flags(calibrated=True)

    @property
    def rescales(self) -> bool:
        """Standardised: w_q lives on the standardised scale, so calibrate re-estimates BN."""
        return not self.restore_scale

    def _stats(self, w):
        """(mean, std) of the weights, detached, over the filters the channel gates keep."""
        kept = w
        if self.kept_by:   # [per-axis masks]: output filters and input channels the channel gates keep
            mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            for k in self.kept_by:
                shape = [1] * w.dim()
                shape[k.dim] = -1
                mask = mask & k().to(w.device).view(shape)
            kept = w[mask]
        kept = kept.detach().double()   # float64: the compact layer's statistics agree to the last bit more often
        std = kept.std().clamp_min(1e-8).to(w.dtype)
        # restored: the grid is centred on 0 (the float weights' own mean is kept, and 0 stays the
        # grid's centre, as export's integer grids need); standardised: on the mean, as the code
        return (w.new_zeros(()) if self.restore_scale else kept.mean().to(w.dtype)), std

    def _z(self, w, stats=None):
        """z in [0, 1] from the standardised weights."""
        mean, std = stats if stats is not None else self._stats(w)
        a = self.alpha.abs().clamp_min(1e-8)
        return (torch.clamp((w - mean) / std / a, -1, 1) + 1) / 2

    def _scale(self, std):
        """The grid's half-width: |alpha|, times std when the weights' scale is restored."""
        return self.alpha.abs() * std if self.restore_scale else self.alpha.abs()

    def forward(self, w):
        if self.bits >= 32:
            return w
        stats = self._stats(w)
        return self._scale(stats[1]) * (2 * self._quantize_unit(self._z(w, stats)) - 1)

    def selected(self, w) -> int:
        return self.chosen_bits(residual_means(self._z(w).detach(), self.candidates))

    @torch.no_grad()
    def affine(self, w):
        n = 2 ** self.bits - 1
        stats = self._stats(w)
        codes = torch.round(self._z(w, stats) * n).long()
        a = self._scale(stats[1]).detach()
        return codes, 2 * a / n, -a

    def decode(self, codes, scale):
        n = 2 ** self.bits - 1
        return (codes.float() - n / 2) * scale


class SBSAct(_BitSharing, PACTAct):
    """Inputs: x_q = |alpha| Q_b(clip(x / |alpha|, 0, 1)) (PACT's grid and gradient at a fixed
    width, alpha initialised to 1 as the code); in search, the bit-sharing decomposition."""
    kind = "sbs"

    def __init__(self, bits, signed="auto", clip_percentile: float | None = None):
        super().__init__(bits, signed, alpha=1.0, clip_percentile=clip_percentile)
        self._init_sharing()

    @classmethod
    def from_spec(cls, bits, spec):
        return cls(bits, spec.signed_inputs, clip_percentile=spec.clip_percentile())

    def start_search(self, bits, from_running: bool = False) -> None:
        if self.signed:
            raise TandemError("bit sharing quantizes unsigned inputs (after a ReLU); this layer's input is "
                              "signed: keep it at a fixed width (first_last, skip or overrides)")
        super().start_search(bits, from_running)

    def _z(self, x):
        return torch.clamp(x / self.alpha.abs().clamp_min(1e-8), 0, 1)

    def quantize(self, x):
        if self.candidates is None:
            return super().quantize(x)
        products, width = self._gate_products(self._z(x).detach())
        return _SharedAct.apply(x, self.alpha, products, self.candidates, width)

    def selected(self) -> int:
        """The width the gates choose: from the running means of the residuals when the search
        keeps them (frozen from the statistics of every training batch), else from the last
        batch this quantizer saw."""
        if self.from_running and int(self.gates.seen) > 0:
            return self.chosen_bits(self.gates.running_means)
        if getattr(self, "last_means", None) is None:
            raise TandemError("an input's bits are chosen from the batches it saw; run a forward pass first")
        return self.chosen_bits(self.last_means)


def search_(model: nn.Module, bits, input_bits: str = "running") -> list:
    """Every `sbs` quantizer of `model` (weights, and inputs found unsigned at calibration)
    becomes a bit-sharing one over `bits`; returns them. `input_bits`: 'running' = the input
    gates decide from running means of the residuals, 'batch' = from each batch's (the code)."""
    if input_bits not in ("running", "batch"):
        raise TandemError(f"input_bits = {input_bits!r}; allowed: running, batch")
    out = []
    for m in model.modules():
        if isinstance(m, (SBSWeight, SBSAct)) and m.bits < 32 and not (isinstance(m, SBSAct) and m.signed):
            # a signed input (no ReLU before it, e.g. MobileNetV2's bottleneck) stays at its fixed width [INFER]
            m.start_search(bits, from_running=isinstance(m, SBSAct) and input_bits == "running")
            out.append(m)
    if not out:
        raise TandemError("search_: the model has no sbs quantizers; quantize_ it with method='sbs' first")
    return out


def float_or_sbs_weights(layers) -> bool:
    """Whether `layers` are all float or all quantized by sbs weight quantizers (the layers whose
    channels a search may gate: a fixed-width min-max grid would move with the channels)."""
    quantized = [getattr(layer, "weight_quantizer", None) for layer in layers]
    return all(q is None for q in quantized) or all(isinstance(q, SBSWeight) for q in quantized)


def standardise_over_kept(layer: nn.Module, kept) -> None:
    """The layer's sbs weight quantizer standardises over the entries `kept` keeps (`kept.dim`:
    the axis, `kept()`: a boolean vector along it), so the gated layer computes what the compact
    one will; a layer without one is left alone."""
    wq = getattr(layer, "weight_quantizer", None)
    if isinstance(wq, SBSWeight):
        wq.kept_by = [*(wq.kept_by or []), kept]


def forget_kept_(model: nn.Module) -> None:
    """Every sbs weight quantizer standardises over all its weights again (the channels the masks
    closed are about to be removed)."""
    for m in model.modules():
        if isinstance(m, SBSWeight):
            m.kept_by = None


def layer_expected_bits(layer: nn.Module) -> tuple:
    """(weight bits, input bits) of a conv/linear layer: a bit-sharing quantizer's expected width
    (with its gates' straight-through gradient), else the layer's fixed width (32: float)."""
    wq, aq = getattr(layer, "weight_quantizer", None), getattr(layer, "input_quantizer", None)
    wb = wq.expected_bits() if isinstance(wq, SBSWeight) else float(getattr(layer, "w_bits", 32))
    ab = aq.expected_bits() if isinstance(aq, SBSAct) else float(getattr(layer, "a_bits", 32))
    return wb, ab


def weight_and_input_quantizers(quantizers) -> tuple[list, list]:
    """`search_`'s quantizers split into the weights' and the inputs' (their thresholds learn on
    alternate steps)."""
    return ([q for q in quantizers if isinstance(q, SBSWeight)],
            [q for q in quantizers if isinstance(q, SBSAct)])


def freeze_chosen_bits_(model: nn.Module) -> dict[str, dict]:
    """Search over: each bit-sharing quantizer keeps the width its hard gates chose, and its
    layer's `w_bits` / `a_bits` say so. Returns {layer: {"w_bits", "a_bits"}} for every quantized
    layer (what the quantize_ record needs to rebuild it: quantize.record_layer_bits)."""
    chosen = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        if isinstance(wq, SBSWeight) and wq.candidates is not None:
            wq.freeze_(wq.selected(layer.weight))
            layer.w_bits = wq.bits
        if isinstance(aq, SBSAct) and aq.candidates is not None:
            aq.freeze_(aq.selected())
            layer.a_bits = aq.bits
        chosen[name] = {"w_bits": layer.w_bits, "a_bits": layer.a_bits}
    return chosen


register_quantizer("sbs", weight=SBSWeight, act=SBSAct, deploy_layout=False,
                   description="SBS's quantizer: standardised weights and inputs clipped at a learnable alpha "
                               "(bit sharing over candidate widths: tandem.quant.bit_sharing)")
