"""Fake-quantizers with straight-through estimators (methods.md §6.1-6.3, §4.6).

A quantizer is an nn.Module: ``q(x)`` returns x rounded to its grid, in float, with the
gradient the paper defines. Weight quantizers also say which integer grid they produced
(`affine`): ``value = code * scale + shift`` with integer ``code`` in [0, 2^bits - 1]; export
and bit-packing use only that. Activation quantizers give `qparams()` for the same purpose.

Data-dependent initialisation (LSQ steps, observer ranges, k-means) is not done here at
construction but by `tandem.quant.calibrate`, so a model rebuilt from a file needs no data.
No forward pass loops over channels or reads a GPU tensor on the host.

Each class builds itself from the policy (`from_spec`) and carries the flags the rest of tandem
asks about; the names a recipe gives are registered at the end of this file (quant/registry.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import TandemError
from ..ste import grad_scale, round_ste
from .registry import register_quantizer


# ---- straight-through building blocks (round_ste, grad_scale: tandem/ste.py) ----------------
def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over a weight (C_out, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def _per_channel_reduce(w: torch.Tensor, fn, per_channel: bool) -> torch.Tensor:
    return fn(w.flatten(1), dim=1).values if per_channel else fn(w.flatten(), dim=0).values


class Quantizer(nn.Module):
    """Shared state: bits, and two persistent flags kept as a buffer so that a model loaded
    from a file knows it was calibrated and whether an input is signed, without any data."""

    kind = "?"
    param_category = "quantizer"   # its parameters' optimiser group (engine/optim.py)

    def __init__(self, bits: int):
        super().__init__()
        if not 1 <= int(bits) <= 32:
            raise TandemError(f"bits must be in 1..32, got {bits!r}")
        self.bits = int(bits)
        self.register_buffer("flags", torch.zeros(2, dtype=torch.uint8))  # [calibrated, signed]
        self.calibrated, self.signed = False, False
        self.observing = False

    def set_flags(self, calibrated: bool | None = None, signed: bool | None = None) -> None:
        if calibrated is not None:
            self.calibrated = bool(calibrated)
        if signed is not None:
            self.signed = bool(signed)
        self.flags.copy_(torch.tensor([self.calibrated, self.signed], dtype=torch.uint8))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flags = state_dict.get(prefix + "flags")
        if flags is not None:
            self.calibrated, self.signed = bool(flags[0]), bool(flags[1])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, calibrated={self.calibrated}"

    def _need_calibration(self):
        raise TandemError(f"{self.kind} quantizer is not calibrated: call tandem.quant.calibrate(model, batches) "
                          f"after quantize_ and before training or evaluating")


# ---- weights -----------------------------------------------------------------------------
class WeightQuantizer(Quantizer):
    # True when the quantized weight is on another scale than the float one (DoReFa's [-1, 1]):
    # the BatchNorm statistics of a pretrained network then no longer fit (calibrate re-estimates them)
    rescales = False
    zero_in_grid = True     # 0 is a grid value: weights pruned to 0 stay 0 (pqkd, methods.md §2.3)
    integer_grid = True     # `affine` is an integer grid: ONNX export writes int8 weights (else float)
    frozen_weight = False   # True: the float weight stops learning once quantized (k-means: the codebook learns)

    def __init__(self, bits: int, per_channel: bool = False, channels: int = 1):
        super().__init__(bits)
        self.per_channel = per_channel
        self.channels = channels

    @classmethod
    def from_spec(cls, bits: int, layer: nn.Module, spec) -> "WeightQuantizer":
        """The quantizer of `layer`'s weight at `bits` under the policy `spec` (a QuantSpec)."""
        return cls(bits, spec.per_channel, layer.weight.shape[0])

    def calibrate_weight(self, w: torch.Tensor) -> None:
        """Initialise from the weights (data-free); the default needs nothing."""
        self.set_flags(calibrated=True)

    # parameters / buffers with one entry per output channel when per_channel (LSQ's step)
    per_channel_state: tuple[str, ...] = ()

    @torch.no_grad()
    def keep_channels(self, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
        """Pruning surgery kept these output / input channels of the layer: slice the
        per-channel state to match (the quantized weights of kept channels are unchanged)."""
        if out_keep is None or not self.per_channel:
            return
        for name in self.per_channel_state:
            t = getattr(self, name)
            sliced = t.index_select(0, out_keep.to(t.device)).clone()
            setattr(self, name, nn.Parameter(sliced, requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else sliced)
        self.channels = len(out_keep)

    def affine(self, w: torch.Tensor):
        """(codes int64 in [0, 2^bits-1], scale, shift) with forward(w) == codes*scale + shift;
        scale/shift are per output channel (shape C_out) or scalars (shape ())."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor):
        """(codes, params): the least a file needs to store; decode(codes, **params) gives
        back forward(w) bit for bit (same float operations)."""
        codes, scale, _ = self.affine(w)
        return codes, {"scale": torch.as_tensor(scale).float()}

    def decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _sign_decode(codes, e):
    return torch.where(codes > 0, 1.0, -1.0) * _channel_view(e, codes)


def _encode_keeping_sign_scale(self, w):
    """Codes from `affine`; 1-bit (sign * E|w|) grids also store their scale E|w|."""
    codes, scale, shift = self.affine(w)
    return codes, ({"scale": -shift.float()} if self.bits == 1 else {})


class DoReFaWeight(WeightQuantizer):
    """DoReFa (Zhou et al. 2016): w_q = 2*quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, 2^k
    levels in [-1, 1]; k = 1: sign(w) * mean|w|. STE through the rounding only, so the gradient
    also flows through tanh and the max (as in the paper)."""

    kind = "dorefa"
    rescales = True
    zero_in_grid = False    # 2^k levels symmetric about 0: 0 is not one of them

    def _normalised(self, w):
        t = torch.tanh(w)
        m = _per_channel_reduce(t.abs(), torch.max, self.per_channel).clamp_min(1e-12)
        return t / _channel_view(m, w)

    def forward(self, w):
        if self.bits >= 32:
            return w
        if self.bits == 1:
            return _binary_ste(w, self.per_channel)
        n = 2 ** self.bits - 1
        z = self._normalised(w) / 2 + 0.5
        return 2 * round_ste(z * n) / n - 1

    @torch.no_grad()
    def affine(self, w):
        if self.bits == 1:
            e = _mean_abs(w, self.per_channel)
            codes = (w >= 0).long()          # sign(0) is taken as +1
            return codes, 2 * e, -e
        n = 2 ** self.bits - 1
        codes = torch.round((self._normalised(w) / 2 + 0.5) * n).long()
        return codes, torch.tensor(2.0 / n), torch.tensor(-1.0)

    encode = _encode_keeping_sign_scale

    def decode(self, codes, scale=None):
        if self.bits == 1:
            return _sign_decode(codes, scale)
        n = 2 ** self.bits - 1
        return 2 * codes.float() / n - 1


def _mean_abs(w, per_channel: bool):
    return w.abs().flatten(1).mean(1) if per_channel else w.abs().mean()


def _binary_ste(w, per_channel: bool):
    """1-bit weights: sign(w) * E|w| (per tensor or per output channel), STE through the sign."""
    return _sign_ste(w) * _channel_view(_mean_abs(w, per_channel), w).detach()


def _sign_ste(w):
    """sign(w) with sign(0) = +1 forward; identity gradient (clipped to |w| <= 1) backward."""
    s = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    c = w.clamp(-1, 1)
    return s.detach() + (c - c.detach())


class PICPQWeight(DoReFaWeight):
    """PIC-PQ's DoReFa variant (§4.6): w~ = tanh(w)/max|tanh w|, w_q = round(w~ n)/n with
    n = 2^(k-1) - 1: a symmetric grid of 2^k - 1 levels (0 included); k = 1: sign(w)*mean|w|
    (DoReFa's binary form, inherited)."""

    kind = "dorefa_picpq"
    zero_in_grid = True

    def forward(self, w):
        if self.bits >= 32 or self.bits == 1:
            return super().forward(w)
        n = 2 ** (self.bits - 1) - 1
        return round_ste(self._normalised(w) * n) / n

    @torch.no_grad()
    def affine(self, w):
        if self.bits == 1:
            return super().affine(w)
        n = 2 ** (self.bits - 1) - 1
        codes = torch.round(self._normalised(w) * n).long() + n
        return codes, torch.tensor(1.0 / n), torch.tensor(-1.0)

    def decode(self, codes, scale=None):
        if self.bits == 1:
            return super().decode(codes, scale)
        n = 2 ** (self.bits - 1) - 1
        return (codes - n).float() / n


class LSQWeight(WeightQuantizer):
    """LSQ (Esser et al. 2020), signed: w_q = round(clip(w/s, -Q_N, Q_P)) * s with a learnable
    step s (per tensor or per output channel), gradient-scaled by 1/sqrt(N * Q_P)."""

    kind = "lsq"
    per_channel_state = ("step",)

    def __init__(self, bits, per_channel=False, channels=1):
        super().__init__(bits, per_channel, channels)
        self.step = nn.Parameter(torch.ones(channels if per_channel else ()))
        self.qn, self.qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        if self.bits == 1:   # 1-bit signed: the two levels -s and 0 would be useless; use {-s, +s}
            raise TandemError("lsq needs at least 2 bits (1-bit LSQ has levels {-s, 0}); use dorefa for 1 bit")

    @torch.no_grad()
    def calibrate_weight(self, w):
        """s = 2 mean|w| / sqrt(Q_P) (LSQ's initialisation)."""
        mean_abs = w.abs().flatten(1).mean(1) if self.per_channel else w.abs().mean()
        self.step.copy_((2 * mean_abs / math.sqrt(self.qp)).clamp_min(1e-8))
        self.set_flags(calibrated=True)

    def forward(self, w):
        if self.bits >= 32:
            return w
        if not self.calibrated:
            self._need_calibration()
        n = w[0].numel() if self.per_channel else w.numel()
        s = _channel_view(grad_scale(self.step, 1.0 / math.sqrt(n * self.qp)), w)
        return round_ste((w / s).clamp(-self.qn, self.qp)) * s

    @torch.no_grad()
    def affine(self, w):
        s = _channel_view(self.step, w)
        codes = torch.round((w / s).clamp(-self.qn, self.qp)).long() + self.qn
        return codes, self.step.detach().clone(), -self.qn * self.step.detach()

    def decode(self, codes, scale):
        return (codes - self.qn).float() * _channel_view(scale, codes)


class MinMaxWeight(WeightQuantizer):
    """Symmetric uniform grid with scale max|w| / (2^(b-1) - 1), recomputed from the weights at
    every forward (no state to calibrate). STE through the rounding; the scale is not learned."""

    kind = "minmax"

    def _scale(self, w):
        q = 2 ** (self.bits - 1) - 1
        m = _per_channel_reduce(w.detach().abs(), torch.max, self.per_channel)
        return (m / q).clamp_min(1e-12), q

    def forward(self, w):
        if self.bits >= 32:
            return w
        if self.bits == 1:
            return _binary_ste(w, self.per_channel)
        s, q = self._scale(w)
        s = _channel_view(s, w)
        return round_ste((w / s).clamp(-q, q)) * s

    @torch.no_grad()
    def affine(self, w):
        if self.bits == 1:
            e = _mean_abs(w, self.per_channel)
            return (w >= 0).long(), 2 * e, -e
        s, q = self._scale(w)
        codes = torch.round((w / _channel_view(s, w)).clamp(-q, q)).long() + q
        return codes, s, -q * s

    def encode(self, w):
        codes, scale, shift = self.affine(w)
        return codes, {"scale": (-shift if self.bits == 1 else scale).float()}

    def decode(self, codes, scale):
        if self.bits == 1:
            return _sign_decode(codes, scale)
        q = 2 ** (self.bits - 1) - 1
        return (codes - q).float() * _channel_view(scale, codes)


# ---- activations (a layer's input) --------------------------------------------------------
class ActQuantizer(Quantizer):
    """Quantizes a layer's input. `signed` is decided at calibration (the input had negative
    values) unless the policy forces it; see docs/quantization.md for each method's signed form."""

    def __init__(self, bits: int, signed: str = "auto", clip_percentile: float | None = None):
        super().__init__(bits)
        self.signed_rule = signed
        # clip_percentile: calibration also measures the clip (`observed_clip`), the mean over the
        # batches of this percentile of |x| (DoReFa's range, PACT's and SBS's alpha start there)
        self.clip_percentile = clip_percentile
        # calibration statistics: not part of the model (not saved)
        self.register_buffer("obs_min", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("obs_max", torch.tensor(float("-inf")), persistent=False)
        self.register_buffer("pct_clip", torch.zeros(()), persistent=False)
        self.register_buffer("pct_clip_n", torch.zeros(()), persistent=False)

    @classmethod
    def from_spec(cls, bits: int, spec) -> "ActQuantizer":
        """The quantizer of a layer's input at `bits` under the policy `spec` (a QuantSpec)."""
        return cls(bits, spec.signed_inputs)

    @torch.no_grad()
    def reset_stats(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if name.startswith(("obs_", "pct_")):
                buf.fill_(float("inf") if name == "obs_min" else float("-inf") if name == "obs_max" else 0)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.obs_min.copy_(torch.minimum(self.obs_min, x.min()))
        self.obs_max.copy_(torch.maximum(self.obs_max, x.max()))
        if self.clip_percentile is not None:
            from .observers import percentile_range
            self.pct_clip += percentile_range(x.abs(), self.clip_percentile)[1]
            self.pct_clip_n += 1

    def observed_clip(self) -> float | None:
        """The calibrated clip (see clip_percentile); None when not measured or all zero."""
        if self.clip_percentile is None or not self.pct_clip_n:
            return None
        v = float(self.pct_clip / self.pct_clip_n)
        return v if v > 0 and math.isfinite(v) else None

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self.signed_rule == "auto":
            signed = bool(self.obs_min < 0) if torch.isfinite(self.obs_min) else False
        else:
            signed = self.signed_rule == "signed"
        self.set_flags(calibrated=True, signed=signed)

    # set by tandem.export while tracing a standalone quantizer (the deploy layout's): QDQ
    export_fn = None

    def forward(self, x):
        if self.export_fn is not None:
            return self.export_fn(x)
        if self.bits >= 32:
            return x
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            self._need_calibration()
        if x.dtype in (torch.float16, torch.bfloat16):   # under autocast: round in float32
            x = x.float()
        return self.quantize(x)

    def quantize(self, x):
        raise NotImplementedError

    def qparams(self):
        """(scale, zero_point, qmin, qmax) as python numbers: forward(x) equals
        (clamp(round(x/scale) + zero_point, qmin, qmax) - zero_point) * scale; None when the
        quantizer's grid is not of that form."""
        raise NotImplementedError


def _grad_where_above(g: torch.Tensor, c: torch.Tensor, t) -> torch.Tensor:
    """g where c > t, else 0. A float threshold uses ReLU's fused backward kernel, which on CPU
    avoids building bool masks (the QAT step benchmark: PACT 1.56x -> 1.19x the FP step); a
    tensor threshold stays on its device."""
    if torch.is_tensor(t):
        return torch.where(c > t, g, 0)
    return torch.ops.aten.threshold_backward(g, c, t)


class _ClipRound(torch.autograd.Function):
    """c = clamp(x, lo, alpha), y = round(c / s) s with s = alpha / n (lo = 0, or -alpha when
    signed): PACT's quantizer, and DoReFa's with alpha = 1. Backward: dy/dx = 1 on (lo, alpha);
    dy/dalpha = 1 where x >= alpha (and -1 where x <= -alpha, signed).

    Only c is saved, and it is exact about the regions: x >= alpha iff c == alpha (iff c is
    above the float just below alpha), x <= lo iff c == lo. On CPU the bounds are read as
    Python floats (no device to stall); on GPU they stay tensors."""

    @staticmethod
    def forward(ctx, x, alpha, n, signed):
        a = alpha.detach().abs().clamp_min(1e-8)
        a_below = torch.nextafter(a, a.new_tensor(-math.inf))
        lo = -a if signed else torch.zeros_like(a)
        if not x.is_cuda:
            a, a_below, lo = float(a), float(a_below), float(lo)
        c = torch.clamp(x, lo, a)
        ctx.save_for_backward(c)
        ctx.bounds, ctx.signed, ctx.shape = (a_below, lo), signed, alpha.shape
        s = a / n
        return torch.div(c, s).round_().mul_(s)

    @staticmethod
    def backward(ctx, g):
        (c,), (a_below, lo) = ctx.saved_tensors, ctx.bounds
        above = _grad_where_above(g, c, a_below)     # g where x >= alpha
        passed = _grad_where_above(g, c, lo)         # g where x > lo
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = above.sum()
            if ctx.signed:
                grad_a = grad_a - (g - passed).sum()     # g where x <= -alpha
            grad_a = grad_a.reshape(ctx.shape)
        return passed - above, grad_a, None, None


class DoReFaAct(ActQuantizer):
    """DoReFa activations: clamp(x, 0, c) then quantize_k (levels c i/(2^k-1)), c = `clip`: 1 in
    the paper, or fixed at calibration (`clip_percentile`: a pretrained network's inputs reach far
    above 1, and clamping them at 1 breaks it before training starts). Signed inputs:
    clamp(x, -c, c) on the symmetric grid c i/(2^(k-1)-1) [INFER: DoReFa has no signed form]."""

    kind = "dorefa"

    def __init__(self, bits, signed="auto", clip_percentile: float | None = None):
        super().__init__(bits, signed, clip_percentile)
        self.register_buffer("clip", torch.tensor(1.0))   # fixed (not learned); saved with the model

    @classmethod
    def from_spec(cls, bits, spec):
        return cls(bits, spec.signed_inputs, clip_percentile=spec.clip_percentile())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "clip", torch.tensor(1.0))   # files written before the clip was saved: 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def finish_calibration(self):
        super().finish_calibration()
        clip = self.observed_clip()
        if clip is not None:
            self.clip.fill_(clip)

    def _n(self):
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def quantize(self, x):
        n = self._n()
        if n == 0:   # 1-bit signed: sign
            return _sign_ste(x)
        return _ClipRound.apply(x, self.clip, n, self.signed)    # round(clamp(x, lo, c) n / c) c / n

    def qparams(self):
        n = self._n()
        if n == 0:                 # 1-bit signed: sign(x), not an integer grid with a zero
            return None
        return (float(self.clip) / n, 0, -n if self.signed else 0, n)


class PACTAct(ActQuantizer):
    """PACT (Choi et al. 2018): y = clip(x, 0, alpha), y_q = round(y (2^k-1)/alpha) alpha/(2^k-1),
    alpha learnable. dy_q/dx = 1 on (0, alpha); dy_q/dalpha = 1 where x >= alpha (0 elsewhere:
    the paper's STE, which drops the rounding-error term). Signed inputs: clip(x, -alpha, alpha)
    on the symmetric grid with 2^(k-1)-1 steps, dy/dalpha = sign(x) outside [INFER]."""

    kind = "pact"

    def __init__(self, bits, signed="auto", alpha: float = 10.0, clip_percentile: float | None = None):
        super().__init__(bits, signed, clip_percentile)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    @classmethod
    def from_spec(cls, bits, spec):
        return cls(bits, spec.signed_inputs, alpha=spec.pact_alpha, clip_percentile=spec.clip_percentile())

    def _n(self):
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @torch.no_grad()
    def finish_calibration(self):
        super().finish_calibration()
        clip = self.observed_clip()   # clip_percentile: alpha starts at the measured clip
        if clip is not None:
            self.alpha.fill_(clip)
        if self.signed and self.bits < 2:
            raise TandemError("pact needs at least 2 bits for a signed input (found at calibration); "
                              "give that layer more bits, or use first_last / skip")

    def quantize(self, x):
        return _ClipRound.apply(x, self.alpha, self._n(), self.signed)

    def qparams(self):
        n, a = self._n(), max(float(self.alpha.detach().abs()), 1e-8)
        return (a / n, 0, -n if self.signed else 0, n)


def _float32_below(v: float) -> float:
    """The largest float32 below v: ``c > _float32_below(v)`` is ``c == v`` for c clipped at v."""
    return float(torch.nextafter(torch.tensor(float(v)), torch.tensor(-math.inf)))


class _LSQRound(torch.autograd.Function):
    """LSQ's quantizer in one function: c = clamp(x / s, -Q_N, Q_P), y = round(c) s. Backward
    (Esser et al. eq. 3, STE): dy/dx = 1 where -Q_N < x/s < Q_P; dy/ds = round(c) - c there and
    the clip bound outside, times the gradient scale. The clip bounds are constants, so the
    masks use the fused threshold kernel on any device; only c is saved."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale_):
        s = step.detach()
        c = torch.div(x, s).clamp_(-qn, qp)
        ctx.save_for_backward(c)
        ctx.qn, ctx.qp_below, ctx.grad_scale = -qn, _float32_below(qp), grad_scale_
        return c.round().mul_(s)

    @staticmethod
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        grad_x = _grad_where_above(g, c, ctx.qn) - _grad_where_above(g, c, ctx.qp_below)
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (torch.dot(g.flatten(), c.round().flatten()) - torch.dot(grad_x.flatten(), c.flatten()))
            grad_s = (grad_s * ctx.grad_scale).reshape(())
        return grad_x, grad_s, None, None, None


class LSQAct(ActQuantizer):
    """LSQ activations: unsigned Q_N = 0, Q_P = 2^b - 1; signed Q_N = 2^(b-1), Q_P = 2^(b-1) - 1.
    Step initialised on calibration data as 2 mean|x| / sqrt(Q_P); gradient scale 1/sqrt(N Q_P)
    with N the features per example."""

    kind = "lsq"

    def __init__(self, bits, signed="auto"):
        super().__init__(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("obs_abs_sum", torch.zeros(()), persistent=False)
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def _range(self):
        if self.signed:
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @torch.no_grad()
    def observe(self, x):
        super().observe(x)
        self.obs_abs_sum += x.abs().sum().float()
        self.obs_count += x.numel()

    @torch.no_grad()
    def finish_calibration(self):
        super().finish_calibration()
        qn, qp = self._range()
        if qp < 1:
            raise TandemError("lsq needs at least 2 bits for a signed input")
        mean_abs = float(self.obs_abs_sum / self.obs_count.clamp_min(1))
        self.step.fill_(max(2 * mean_abs / math.sqrt(qp), 1e-8))

    def quantize(self, x):
        qn, qp = self._range()
        return _LSQRound.apply(x, self.step, qn, qp, 1.0 / math.sqrt(x[0].numel() * qp))

    def qparams(self):
        qn, qp = self._range()
        return (float(self.step.detach().abs()), 0, -qn, qp)


class ObserverAct(ActQuantizer):
    """Post-training activation quantizer: an affine uniform grid over the calibrated range
    [lo, hi] (always containing 0), zero point rounded to an integer; fixed afterwards.
    STE inside the range (usable for QAT too, the range is not learned)."""

    kind = "minmax"

    def __init__(self, bits, signed="auto", percentile: float | None = None):
        super().__init__(bits, signed)
        self.percentile = percentile
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("pct_lo", torch.zeros(()), persistent=False)
        self.register_buffer("pct_hi", torch.zeros(()), persistent=False)
        self.register_buffer("pct_n", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def observe(self, x):
        super().observe(x)
        if self.percentile is not None:
            from .observers import percentile_range
            lo, hi = percentile_range(x, self.percentile)
            self.pct_lo += lo
            self.pct_hi += hi
            self.pct_n += 1

    @torch.no_grad()
    def finish_calibration(self):
        super().finish_calibration()
        from .observers import affine_qparams
        if self.percentile is not None and self.pct_n > 0:
            lo, hi = float(self.pct_lo / self.pct_n), float(self.pct_hi / self.pct_n)
        else:
            lo, hi = float(self.obs_min), float(self.obs_max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = 0.0, 1.0
        if not self.signed:
            lo = max(lo, 0.0)
        scale, zp = affine_qparams(lo, hi, self.bits)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)

    def quantize(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point.to(torch.int32), 0,
                                                     2 ** self.bits - 1)

    def qparams(self):
        return (float(self.scale), int(self.zero_point), 0, 2 ** self.bits - 1)


class PercentileAct(ObserverAct):
    """ObserverAct whose range is clipped at the policy's `percentile` of the calibration inputs."""

    @classmethod
    def from_spec(cls, bits, spec):
        return cls(bits, spec.signed_inputs, percentile=spec.percentile)


register_quantizer("dorefa", weight=DoReFaWeight, act=DoReFaAct,
                   description="DoReFa-Net weights (tanh) and clipped [0,1] activations, STE")
register_quantizer("dorefa_picpq", weight=PICPQWeight, act=DoReFaAct,
                   description="PIC-PQ's DoReFa variant: symmetric 2^k-1-level weight grid")
register_quantizer("pact", weight=DoReFaWeight, act=PACTAct,
                   description="PACT: learnable activation clip alpha; DoReFa weights")
register_quantizer("lsq", weight=LSQWeight, act=LSQAct, description="LSQ: learnable step sizes with gradient scaling")
register_quantizer("minmax", weight=MinMaxWeight, act=ObserverAct,
                   description="min-max ranges (PTQ): max|w| weights, observed activation range")
register_quantizer("percentile", weight=MinMaxWeight, act=PercentileAct,
                   description="min-max weights, activations clipped at a percentile (PTQ)")
