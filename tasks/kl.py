"""The KL divergence of a logit change, accurate at the smallest perturbations and cheap.

KL(softmax(z + dz) || softmax(z)) from the clean distribution p and the change dz, in one
expm1 and a few elementwise passes (eager), or one fused kernel (torch.compile) that is used
only after it has matched a 50-digit reference at eps 1e-5..1 on this machine.
"""

from __future__ import annotations

import math
import warnings

import torch

_fused = None  # the compiled kernel once it has passed the check


def kl_from_logit_change(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """KL(q || p) for q = softmax(z + dz), without cancelling two nearly equal log-softmaxes.

    p: [s, V] (one clean distribution per position, leading 1s allowed), dz: [..., s, V].
    Softmax ignores a constant per row, so dz is centred on its p-mean: x = dz - E_p[dz].
    With g = expm1(x), f = x e^x - g (every term O(x^2) and >= 0), F = E_p[f], G = E_p[g]:
    KL = E_q[x] - log E_p[e^x] = F / (1 + G) + G / (1 + G) - log1p(G), whose last two terms
    are O(G^2) = O(x^4): small changes keep their digits. Rows with a large change (G > 1,
    or an overflow) take the plain log-probability form, finite where p underflows to 0.
    """
    p = p.reshape(p.shape[-2:])
    kl, G = (_fused or _kl_small)(p, dz)
    big = ~torch.isfinite(kl) | (G > 1.0)
    if bool(big.any()):
        kl[big] = _kl_plain(p.expand_as(dz)[big], dz[big])
    return kl


def _kl_small(p: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, G) by the centred form; the sums over the vocabulary are matrix products."""
    x = dz - _p_mean(dz, p).unsqueeze(-1)
    g = torch.expm1(x)
    f = torch.addcmul(x - g, x, g)  # x e^x - expm1(x) = x g - (g - x)
    G = _p_mean(g, p)
    return _p_mean(f, p) / (1 + G) + (G / (1 + G) - torch.log1p(G)), G


def _p_mean(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """E_p[t] per position: sum_v p[s, v] t[..., s, v]."""
    return torch.einsum("...sv,sv->...s", t, p)


def _kl_small_fusable(p: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same formula as reductions a compiler fuses into one pass over dz. Compiled code
    computes expm1 as exp - 1 (measured: 1e-3 relative error at 1e-5), so small |x| take
    Taylor series of g and f instead: more terms than eager could afford, no digits lost."""
    x = dz - (dz * p).sum(-1, keepdim=True)
    small = x.abs() < _SERIES_EDGE
    g_series = x * _horner(x, _EXPM1_COEFFS)  # expm1(x) = sum x^k / k!
    f_series = x * x * _horner(x, _F_COEFFS)  # x e^x - expm1(x) = sum (k-1)/k! x^k, k >= 2
    e = torch.exp(x)
    g = torch.where(small, g_series, e - 1)
    f = torch.where(small, f_series, x * e - (e - 1))
    G = (g * p).sum(-1)
    return (f * p).sum(-1) / (1 + G) + (G / (1 + G) - torch.log1p(G)), G


# |x| below which the series run; 10 terms then reach float64's last digit (0.05^10 / 10!).
_SERIES_EDGE = 0.05
_EXPM1_COEFFS = [1 / math.factorial(k) for k in range(1, 11)]  # x^(k-1) after one x factored
_F_COEFFS = [(k - 1) / math.factorial(k) for k in range(2, 12)]  # x^(k-2) after x^2 factored


def _horner(x: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    """sum_i coeffs[i] x^i."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def _kl_plain(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """KL row by row from log-probabilities: exact for large changes; 0 log 0 = 0."""
    logp = torch.log(p)
    d = dz - torch.logsumexp(logp + dz, dim=-1, keepdim=True)  # log(q / p), no cancellation
    q = torch.exp(logp + d)
    return torch.where(q > 0, q * d, torch.zeros_like(q)).sum(-1)


# ---------------------------------------------------------------------------------------------
# The fused kernel, behind a switch and an accuracy check.


def exact_kl(z0: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z0 + dz) || softmax(z0)) per row of [rows, V], in 50-digit arithmetic."""
    import mpmath

    out = []
    with mpmath.workdps(50):
        for a_row, d_row in zip(z0.double().tolist(), dz.double().tolist()):
            a = [mpmath.mpf(v) for v in a_row]
            b = [x + mpmath.mpf(d) for x, d in zip(a, d_row)]
            la = mpmath.log(mpmath.fsum(map(mpmath.exp, a)))
            lb = mpmath.log(mpmath.fsum(map(mpmath.exp, b)))
            out.append(float(mpmath.fsum(mpmath.exp(y - lb) * ((y - lb) - (x - la))
                                         for x, y in zip(a, b))))
    return torch.tensor(out, dtype=torch.float64)


# float32 rounding of the O(x) terms costs digits in proportion to 1 / x: measured ~2e-3 at
# eps 1e-5 and ~1e-6 at 1 on the check's logits; these bounds are 4-10x that.
def kl_tolerance(dtype: torch.dtype, eps: float) -> float:
    return 1e-9 if dtype == torch.float64 else max(1e-5, 1e-7 / eps)


def kl_accuracy_errors(fn, dtype: torch.dtype, device: str | torch.device = "cpu",
                       V: int = 400) -> dict[float, float]:
    """Largest relative error of fn(p, dz) -> KL against exact_kl, per eps in 1e-5..1."""
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, V, generator=gen, dtype=torch.float64) * 3
    # A response: random per token plus a uniform shift (which softmax ignores and an
    # uncentred formula would have to cancel).
    shape = torch.randn(2, 3, V, generator=gen, dtype=torch.float64) + 2.0
    errors = {}
    for eps in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        z, dz = z0.to(dtype), (shape * eps).to(dtype)
        got = fn(torch.softmax(z, -1).to(device), dz.to(device)).double().cpu()
        want = torch.stack([exact_kl(z, dz[c]) for c in range(dz.shape[0])])
        err = float(((got - want).abs() / want).max())
        errors[eps] = err if bool(torch.all(got >= 0)) else float("inf")
    return errors


def use_fused_kl(enable: bool = True, dtypes=(torch.float32, torch.float64),
                 device: str | torch.device = "cpu") -> bool:
    """Switch the fused (torch.compile) KL on if it compiles and meets kl_tolerance in every
    dtype on this device; off otherwise (with a warning saying why). Returns the state."""
    global _fused
    _fused = None
    if not enable:
        return False
    try:
        kernel = torch.compile(_kl_small_fusable, dynamic=True)
        for dtype in dtypes:
            errors = kl_accuracy_errors(lambda p, dz, k=kernel: k(p, dz)[0], dtype, device)
            worst = max(errors, key=lambda e: errors[e] / kl_tolerance(dtype, e))
            if errors[worst] > kl_tolerance(dtype, worst):
                warnings.warn(f"fused KL off: {dtype} error {errors[worst]:.2g} at eps "
                              f"{worst:g} exceeds {kl_tolerance(dtype, worst):g}", stacklevel=2)
                return False
    except Exception as exc:  # noqa: BLE001 (no compiler, unsupported backend: stay eager)
        warnings.warn(f"fused KL off: torch.compile failed ({type(exc).__name__}: {exc})",
                      stacklevel=2)
        return False
    _fused = kernel
    return True
