"""The KL divergence of a logit change, accurate at the smallest perturbations and cheap.

KL(softmax(z + dz) || softmax(z)) from the clean distribution p and the change dz, in one
expm1 and a few elementwise passes (eager), or one fused kernel (torch.compile) that is used
only after it has matched a 50-digit reference at eps 1e-5..1 on this machine, and the eager
float64 formula at each vocabulary size it meets (its first use there). This module
also owns the process-wide switch between the two (`set_fused_kl_mode`: the spec's
`engine.fused_kl`), and the on-disk record of the gate's verdict per torch version and CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tasks.user_cache import cache_dir

log = logging.getLogger(__name__)

_fused = None  # the compiled kernel (a _StaticVocab) once it has passed the gate


def kl_from_logit_change(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """KL(q || p) for q = softmax(z + dz), without cancelling two nearly equal log-softmaxes.

    p: [s, V] (one clean distribution per position, leading 1s allowed), dz: [..., s, V].
    Softmax ignores a constant per row, so dz is centred on its p-mean: x = dz - E_p[dz].
    With g = expm1(x), f = x e^x - g (every term O(x^2) and >= 0), F = E_p[f], G = E_p[g]:
    KL = E_q[x] - log E_p[e^x] = F / (1 + G) + G / (1 + G) - log1p(G), whose last two terms
    are O(G^2) = O(x^4): small changes keep their digits. Rows with a large change (G > 1,
    or an overflow) take the plain log-probability form, finite where p underflows to 0.
    """
    global _fused
    p = p.reshape(p.shape[-2:])
    if _fused is None:
        _count_eager(dz.numel())
    kl = G = None
    if _fused is not None:
        try:
            kl, G = _fused(p, dz)
        except Exception as exc:  # noqa: BLE001 (a compile failure at first use: stay eager)
            _fused = None
            log.warning("fused KL off: the compiled kernel failed at first use (%s: %s); "
                        "eager KL from now on", type(exc).__name__, exc)
    if kl is None:
        kl, G = _kl_small(p, dz)
    big = ~torch.isfinite(kl) | (G > 1.0)
    if bool(big.any()):
        kl[big] = _kl_plain(p.expand_as(dz)[big], dz[big])
    return kl


def fused_kl_on() -> bool:
    """Whether the compiled kernel computes the KL now (the engine sizes its chunks by it)."""
    return _fused is not None


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


class _StaticVocab:
    """The compiled kernel with the vocabulary size static and the rows dynamic.

    Inductor vectorises the vocabulary loop only when its length is a compile-time constant:
    measured on this project's 2-core CPU, [4, 32, 49152] float32 takes 4.4 ms static against
    12.9 ms with every size dynamic (and 21-38 ms eager). So the leading sizes are marked
    dynamic (one kernel serves every pass of a model) and each (dtype, vocabulary) compiles
    once; at its first use the kernel must match the eager float64 formula at that size
    (kl_tolerance at eps 1e-5..1) or it raises, and the caller goes back to eager.
    """

    def __init__(self, compiled):
        self.compiled = compiled
        self.checked: set[tuple[torch.dtype, int]] = set()
        # Dynamo compiles sizes 1 apart, so a (dtype, vocabulary) takes up to 4 kernels (one
        # row or cell, or several); its default limit of 8 per function would leave a model
        # used in both dtypes beside the gate's vocabulary running uncompiled.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)

    def __call__(self, p: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = dz.shape[-1]
        if (dz.dtype, vocab) not in self.checked:
            why = self.check(dz.dtype, dz.device, vocab, reference="eager")
            if why:
                raise ValueError(f"inaccurate at vocabulary {vocab}: {why}")
        return self._run(p, dz)

    def check(self, dtype: torch.dtype, device, vocab: int, reference: str) -> str | None:
        """Why this kernel may not be used for (dtype, vocab), or None (then remembered)."""
        errors = kl_accuracy_errors(lambda a, b: self._run(a, b)[0], dtype, device, V=vocab,
                                    reference=reference)
        worst = max(errors, key=lambda e: errors[e] / kl_tolerance(dtype, e))
        if errors[worst] > kl_tolerance(dtype, worst):
            return (f"{dtype} error {errors[worst]:.2g} at eps {worst:g} exceeds "
                    f"{kl_tolerance(dtype, worst):g}")
        self.checked.add((dtype, vocab))
        return None

    def _run(self, p: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = dz.reshape(-1, *dz.shape[-2:])  # [C, s, V]: one kernel for every leading shape
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        torch._dynamo.maybe_mark_dynamic(rows, 1)
        torch._dynamo.maybe_mark_dynamic(p, 0)
        kl, G = self.compiled(p, rows)
        return kl.reshape(dz.shape[:-1]), G.reshape(dz.shape[:-1])


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
                       V: int = 400, reference: str = "exact") -> dict[float, float]:
    """Largest relative error of fn(p, dz) -> KL against exact_kl (reference "exact"), or
    against the eager formula in float64 ("eager": fast at a real vocabulary; it matches
    exact_kl to 1e-9, tests/test_engine_kl.py), per eps in 1e-5..1."""
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, V, generator=gen, dtype=torch.float64) * 3
    # A response: random per token plus a uniform shift (which softmax ignores and an
    # uncentred formula would have to cancel).
    shape = torch.randn(2, 3, V, generator=gen, dtype=torch.float64) + 2.0
    errors = {}
    for eps in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        z, dz = z0.to(dtype), (shape * eps).to(dtype)
        got = fn(torch.softmax(z, -1).to(device), dz.to(device)).double().cpu()
        if reference == "eager":
            z64, dz64 = z.double(), dz.double()
            want = _kl_small(torch.softmax(z64, -1), dz64)[0]
        else:
            want = torch.stack([exact_kl(z, dz[c]) for c in range(dz.shape[0])])
        err = float(((got - want).abs() / want).max())
        errors[eps] = err if bool(torch.all(got >= 0)) else float("inf")
    return errors


def use_fused_kl(enable: bool = True, dtypes=(torch.float32, torch.float64),
                 device: str | torch.device = "cpu", cache: Path | None | bool = None) -> bool:
    """Switch the fused (torch.compile) KL on if it compiles and meets kl_tolerance in every
    dtype on this device; off otherwise (one log line saying why). Returns the state.

    The gate's verdict is kept in `cache` (default gate_cache_path(); False: no record) per
    torch version, CPU and device, so a process that finds a pass there only compiles (at
    first use; torch's own cache makes that quick) and one that finds a failure stays eager.
    """
    global _fused
    _fused = None
    if not enable:
        return False
    path = gate_cache_path() if cache is None else (cache or None)
    key = _gate_key(dtypes, device)
    known = _read_gate(path, key)
    if known is not None and not known["passed"]:
        log.warning("fused KL off: %s (gate result cached in %s)", known["why"], path)
        return False
    kernel = _StaticVocab(torch.compile(_kl_small_fusable, dynamic=False))
    if known is None:
        t0 = time.perf_counter()
        why = _gate(kernel, dtypes, device)
        _write_gate(path, key, why, time.perf_counter() - t0)
        if why:
            log.warning("fused KL off: %s; eager KL", why)
            return False
    _fused = kernel
    return True


def _gate(kernel, dtypes, device) -> str | None:
    """Why the compiled kernel may not be used here, or None when it passes."""
    try:
        for dtype in dtypes:
            why = kernel.check(dtype, device, 400, reference="exact")
            if why:
                return why
    except Exception as exc:  # noqa: BLE001 (no compiler, unsupported backend: stay eager)
        return f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


# ---------------------------------------------------------------------------------------------
# The process-wide mode (spec `engine.fused_kl`): off, on (gate now), auto.

FUSED_KL_MODES = ("auto", "on", "off")
# auto switches the fused kernel on once this process has put this many vocabulary-wide
# elements through the eager KL: by then the eager KL has taken about as long as a compile
# and gate (measured idle: gate 28 s cold; eager 7.6-13 ns per element, the fused kernel
# 2 ns with its vocabulary static; bench/results/kl_static_vocab_idle.txt), so a long run
# pays the compile once and a short one (a test, a small sweep) never does.
AUTO_AFTER_ELEMENTS = 2_000_000_000
_mode = "off"
_device: str | torch.device = "cpu"
_eager_elements = 0


def set_fused_kl_mode(mode: str, device: str | torch.device = "cpu") -> bool:
    """Set how this process computes the KL: "off" (eager), "on" (compile and gate now, eager
    if that fails), "auto" (as on, once the eager KL has done AUTO_AFTER_ELEMENTS of work, and
    only where a C++ compiler exists). Returns whether the fused kernel is on now."""
    global _mode, _device, _eager_elements
    if mode not in FUSED_KL_MODES:
        raise ValueError(f"fused_kl must be one of {', '.join(FUSED_KL_MODES)}, got {mode!r}")
    _mode, _device, _eager_elements = mode, device, 0
    if mode == "on":
        return use_fused_kl(True, device=device)
    if mode == "auto" and not has_compiler(device):
        log.info("fused KL: auto stays eager (no C++ compiler for torch.compile)")
        _mode = "off"
    return use_fused_kl(False)


def has_compiler(device: str | torch.device = "cpu") -> bool:
    """Whether torch.compile can build kernels here: a C++ compiler on the CPU (inductor's
    CXX, else c++/g++/clang++ on PATH); CUDA builds with Triton, which torch brings."""
    if torch.device(device).type == "cuda":
        return True
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def _count_eager(elements: int) -> None:
    global _eager_elements, _mode
    if _mode != "auto":
        return
    _eager_elements += elements
    if _eager_elements >= AUTO_AFTER_ELEMENTS:
        _mode = "on"  # decided: gate once, whatever it says
        log.info("fused KL: auto switching on after %.1e eager elements", _eager_elements)
        use_fused_kl(True, device=_device)


# ---------------------------------------------------------------------------------------------
# The gate's verdict on disk.


def gate_cache_path() -> Path:
    return cache_dir() / "fused_kl_gate.json"


def _gate_key(dtypes, device) -> str:
    """torch version, CPU model, device and dtypes: what the gate's verdict depends on."""
    dev = torch.device(device)
    if dev.type == "cuda":
        where = torch.cuda.get_device_name(dev)
    else:
        where = platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                where += " " + next((ln.split(":", 1)[1].strip() for ln in fh
                                     if ln.startswith("model name")), "")
        except OSError:
            pass
    names = ",".join(str(d).removeprefix("torch.") for d in dtypes)
    return f"torch {torch.__version__} | {dev.type} {where} | {names}"


def _read_gate(path: Path | None, key: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # absent or unreadable: gate again


def _write_gate(path: Path | None, key: str, why: str | None, secs: float) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = {"passed": why is None, "why": why or "", "gate_s": round(secs, 1)}
        # Written whole and renamed: concurrent actors never read half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name)
        with os.fdopen(fd, "w") as fh:
            json.dump(table, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("fused KL: gate result not cached (%s)", exc)
