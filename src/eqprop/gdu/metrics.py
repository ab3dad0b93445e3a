"""Agreement between EP's per-step updates and BPTT's per-step gradients (SPEC §5).

All functions take the *reference* ``r(t) = -∇^BPTT(t)`` (already negated, so
that agreement means r ≈ Δ) and the EP trace ``Δ(t)``, both ``[K, ...]``.

Synchronous updates make a layer's BPTT trace exactly zero on every other
step (and on the first steps, before the error signal reaches the layer; a
head parameter's trace is zero after t = 1). Those structural zeros say
nothing about agreement, so :func:`active_steps` keeps only the steps where
the layer's reference is not identically zero, and the RMSE is computed over
those steps alone (numerator and denominator). Totals (sign agreement, angle)
sum over all K steps: they are the estimates themselves.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def active_steps(reference: Tensor) -> Tensor:
    """``[K]`` bool: the steps where the layer's reference trace is not identically zero."""
    return reference.flatten(1).ne(0).any(dim=1)


def unit_rmse(reference: Tensor, estimate: Tensor, steps: Tensor | None = None) -> Tensor:
    """Per unit: ``sqrt(Σ_t (r - Δ)² / max(Σ_t r², Σ_t Δ²))`` over ``steps``, 0 where both are zero.

    Units are the trailing elements (every synapse; every neuron of every sample).
    """
    if steps is None:
        steps = active_steps(reference)
    r = reference[steps].flatten(1).double()
    d = estimate[steps].flatten(1).double()
    if r.shape[0] == 0:
        return torch.zeros(reference[0].numel(), dtype=torch.float64, device=reference.device)
    num = (r - d).pow(2).sum(dim=0)
    den = torch.maximum(r.pow(2).sum(dim=0), d.pow(2).sum(dim=0))
    # 0 where both are zero; NaN (from NaN or inf inputs) stays NaN
    return torch.where(den == 0, torch.zeros_like(num), num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def sign_agreement(reference_total: Tensor, estimate_total: Tensor) -> float:
    """Percentage of units whose total has the sign of the reference total.

    Units whose reference total is exactly zero (e.g. synapses from a zero
    input pixel) have no sign to agree with and are left out; NaN if none is left.
    """
    r, d = reference_total.flatten(), estimate_total.flatten()
    defined = r.ne(0)
    count = int(defined.sum())
    if count == 0:
        return float("nan")
    return 100.0 * float((torch.sign(r[defined]) == torch.sign(d[defined])).sum()) / count


def angle_deg(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> float:
    """Angle in degrees between two vectors (lists of tensors are flattened and concatenated)."""
    if isinstance(a, (list, tuple)):
        a = torch.cat([t.flatten() for t in a])
    if isinstance(b, (list, tuple)):
        b = torch.cat([t.flatten() for t in b])
    a, b = a.flatten().double(), b.flatten().double()
    norms, dot = float(a.norm() * b.norm()), float(a @ b)
    if norms == 0.0 or not math.isfinite(norms) or not math.isfinite(dot):
        return float("nan")   # no direction, or NaN/inf values: not a perfect agreement
    cosine = max(-1.0, min(1.0, dot / norms))
    return math.degrees(math.acos(cosine))


def layer_metrics(reference: Tensor, estimate: Tensor) -> dict[str, object]:
    """Everything reported for one layer.

    ``rmse_mean``/``rmse_std`` over all units (SPEC: 0 for a unit whose traces
    are both zero); ``rmse_mean_active`` over the units with a nonzero trace;
    ``sign_agreement`` (%) and ``angle_deg`` of the totals; ``steps_used``
    (1-based) and ``excluded_ep_fraction``, the norm of EP's trace on the
    excluded steps relative to its norm on the used ones.
    """
    steps = active_steps(reference)
    values = unit_rmse(reference, estimate, steps)
    mean = float(values.mean())
    std = float(values.std(correction=0)) if values.numel() > 1 else 0.0
    # units where both traces are zero count as 0 (SPEC); e.g. synapses from always-zero pixels
    r, d = reference[steps].flatten(1), estimate[steps].flatten(1)
    live = r.ne(0).any(dim=0) | d.ne(0).any(dim=0)
    excluded = ~steps
    kept_energy = float(estimate[steps].double().pow(2).sum())
    dropped_energy = float(estimate[excluded].double().pow(2).sum())
    return {
        "rmse_mean": mean,
        "rmse_std": std,
        "rmse_mean_active": float(values[live].mean()) if bool(live.any()) else 0.0,
        "units": int(values.numel()),
        "units_active": int(live.sum()),
        "sign_agreement": sign_agreement(reference.sum(0), estimate.sum(0)),
        "angle_deg": angle_deg(reference.sum(0), estimate.sum(0)),
        "steps_used": [int(t) + 1 for t in torch.nonzero(steps).flatten().tolist()],
        # how much of EP's trace lies on the excluded (structurally zero) steps, relative
        "excluded_ep_fraction": math.sqrt(dropped_energy / kept_energy) if kept_energy > 0 else float("nan"),
    }
