"""The GDU theorem check (SPEC §5): EP's per-step updates against BPTT's per-step gradients.

:func:`run_gdu` runs the free phase (T1 steps, the last K of them recorded
with autograd for BPTT), then the nudged phase of every estimator from the
same s*, and compares step by step, t = 1..K:

- weights: ``Δ_θ(t)`` (:mod:`.ep_steps`) against ``-∇^BPTT_θ(t)``, the
  contribution of the t-th step counted back from T (:mod:`.bptt_steps`);
- neurons: ``Δ_s(t) = (s^β_t - s^β_{t-1})/β`` against
  ``-σ'(u_{T-t}) ⊙ ∂L/∂s_{T-t+1}``, i.e. in **pre-activation space**: BPTT's
  gradient with respect to the pre-activation u of the step. With σ outside
  ∂Φ/∂s, EP's neuron traces equal that (not ∂L/∂s itself) to first order in β,
  while its weight traces equal BPTT's directly. (Exactly so with the nudge
  inside σ; with the nudge after σ the output's σ' also enters.)

Structural zeros of synchronous updates are excluded from the RMSE
(:mod:`.metrics`). Per estimator and layer (neurons ``s1..sN``, parameters by
name) the result holds ``rmse_mean``, ``rmse_std``, ``sign_agreement`` (%),
``angle_deg`` and the steps used; per estimator the ``angle_deg`` between
the total update and the total BPTT gradient, all parameters concatenated.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..config import ConfigError, RunConfig
from ..dynamics import run_phase
from ..estimators.base import Estimator, Phases
from ..estimators.bptt import BPTT
from ..models.base import EnergyModel
from .bptt_steps import bptt_step_grads
from .ep_steps import EP_ESTIMATORS, ep_step_updates, symmetric_traces
from .metrics import angle_deg, layer_metrics
from ..plotting import PLOTS_AVAILABLE
from .plots import plot_rmse, plot_traces

#: the defaults of ``eqprop gdu``: the regime where the theorem holds, whatever the preset trains with
#: (a small β, the output nudged inside σ, a free phase run until it has converged)
GDU_BETA = 0.01
GDU_LR = 1e-6             # C-EP/C-VF: small enough that the weights barely move within the phase (the theorem's η → 0)
CONTINUAL_GAP = 0.1       # above it, the continual updates are too far from their η → 0 limit to show the theorem
LARGE_BETA = 0.05         # above it, EP's updates match BPTT's only roughly (first order in β)
CONVERGED = 1e-6          # the free phase's residual and change over its last K steps, at most
MAX_T1 = 20000            # the most free steps the automatic T1 runs
GDU_JSON = "gdu.json"
TRACES_PNG = "gdu_traces.png"
RMSE_PNG = "gdu_rmse.png"
P_MODEL_ESTIMATORS = ("one_sided", "symmetric", "c_ep")
VF_MODEL_ESTIMATORS = ("vf", "c_vf")


def _parameter_names(model: EnergyModel) -> list[str]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of.get(id(p), f"param{i}") for i, p in enumerate(model.trainable_parameters())]


def _residual(model: EnergyModel, clamped: Any, state: list[Tensor]) -> float:
    nxt = model.step(clamped, state)
    return max(float((a - b).abs().max()) for a, b in zip(nxt, state))


def run_gdu(model: EnergyModel, x: Tensor, target: Tensor, *, t1: int, k: int, beta: float,
            estimators: Sequence[str] | None = None, lr: float | Sequence[float] = GDU_LR,
            out_dir: str | Path | None = None, seed: int = 0, tolerance: float = 1e-6,
            samples: int = 4) -> dict[str, Any]:
    """Check the GDU property on one batch and return (and with ``out_dir``, write) the report.

    ``x``, ``target`` (one-hot): a batch in the model's dtype and device;
    ``t1`` free steps (T), ``k`` nudged steps (K <= T1), ``beta`` > 0;
    ``estimators``: any of one_sided, one_sided_neg, symmetric, c_ep (P-models),
    vf, c_vf (None: one_sided, symmetric, c_ep for P-models, vf, c_vf for
    vector-field models); ``lr``: C-EP/C-VF learning rate (one, or one per
    layer); ``seed``: which synapses and neurons are plotted; ``tolerance``:
    convergence threshold on the free phase (recorded; a warning if above);
    ``samples``: plotted synapses and neurons each.
    With ``out_dir``: ``gdu.json``, ``gdu_traces.png`` and ``gdu_rmse.png``.
    The model is left unchanged; the check runs in eval mode (no dropout).
    """
    # arguments are checked before any work; ConfigError (a ValueError) is a usage error in the CLI
    if k < 1 or t1 < k:
        raise ConfigError(f"need 1 <= K <= T1, got K={k}, T1={t1}")
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"β must be a finite number > 0 (the check nudges at +β and -β), got {beta}")
    vf_model = model.is_vector_field
    if estimators is None:
        estimators = VF_MODEL_ESTIMATORS if vf_model else P_MODEL_ESTIMATORS
    estimators = list(dict.fromkeys(estimators))
    unknown = [e for e in estimators if e not in EP_ESTIMATORS]
    if unknown:
        raise ConfigError(f"unknown GDU estimator {', '.join(unknown)}; choose among {', '.join(EP_ESTIMATORS)}")
    if vf_model:
        bad = [e for e in estimators if e not in VF_MODEL_ESTIMATORS]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: a vector-field model has no Φ; use {', '.join(VF_MODEL_ESTIMATORS)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clamped = model.clamp(x)
            start = run_phase(model, clamped, model.init_state(x), t1 - k)   # s_{T-K}
        bptt = bptt_step_grads(model, x, target, start, k)
        free = bptt.final_state                                             # s_T = s*
        with torch.no_grad():
            residual = _residual(model, model.clamp(x), free)
            drift = max(float((a - b).abs().max()) for a, b in zip(free, start))
            # the ±β phases serve one-sided, symmetric and the ±β curves of the figure: run them once
            sided = {}
            if {"one_sided", "one_sided_neg", "symmetric"} & set(estimators):
                sided = {name: ep_step_updates(model, x, free, target, beta, k, name)
                         for name in ("one_sided", "one_sided_neg")}
            traces = {}
            for name in tqdm(estimators, desc="gdu", unit="estimator", leave=False, disable=None):
                if name in sided:
                    traces[name] = sided[name]
                elif name == "symmetric":
                    traces[name] = symmetric_traces(sided["one_sided"], sided["one_sided_neg"])
                else:
                    traces[name] = ep_step_updates(model, x, free, target, beta, k, name, lr)
    finally:
        model.train(was_training)
    converged = max(residual, drift) <= tolerance
    regime = regime_notes(model, beta, converged, residual, drift, tolerance)
    for name in ("c_ep", "c_vf"):
        if name in traces:
            with torch.no_grad():  # the η → 0 limit: the same phase with the weights frozen
                limit = ep_step_updates(model, x, free, target, beta, k, name, 0.0)
            gap = relative_gap(traces[name].params, limit.params)
            if gap > CONTINUAL_GAP:
                regime.append(f"{name}: at --lr {lr} the weights move enough during the phase to change it (the "
                              f"updates' sum is {100 * gap:.0f}% from its η → 0 limit); the theorem holds as "
                              f"η → 0: give a smaller --lr (default {GDU_LR:g})")

    # references: -BPTT, neurons in pre-activation space
    ref_neurons = [-(g * d) for g, d in zip(bptt.neurons, bptt.sigma_prime)]
    ref_params = [-g for g in bptt.params]
    neuron_names = [f"s{n + 1}" for n in range(len(ref_neurons))]
    param_names = _parameter_names(model)
    total_bptt = [r.sum(0) for r in ref_params]
    if not any(bool(r.ne(0).any()) for r in ref_params):
        regime.append("BPTT's gradients are zero on every parameter (the states sit where σ' = 0, or the loss "
                      "does not depend on them): there is nothing to compare; no traces are plotted")

    results: dict[str, Any] = {}
    for name, trace in traces.items():
        layers = {}
        for layer, ref, est in zip(neuron_names, ref_neurons, trace.neurons):
            layers[layer] = {"kind": "neurons", **layer_metrics(ref, est)}
        for layer, ref, est in zip(param_names, ref_params, trace.params):
            layers[layer] = {"kind": "weights", **layer_metrics(ref, est)}
        results[name] = {"angle_deg": angle_deg([p.sum(0) for p in trace.params], total_bptt), "layers": layers}

    report = {
        "settings": {
            "t1": t1, "k": k, "beta": beta, "lr": lr if isinstance(lr, (int, float)) else list(lr),
            "seed": seed, "estimators": estimators, "batch_size": int(x.shape[0]),
            "model": type(model).__name__, "dtype": str(x.dtype).removeprefix("torch."),
            "activation": getattr(getattr(model, "activation", None), "name", None),
            "nudge_inside": getattr(model.head, "nudge_inside", None),
            "free_residual": residual, "free_change_last_k": drift, "tolerance": tolerance,
            "converged": converged, "bptt_loss": bptt.loss, "regime_notes": regime,
            "neuron_space": "pre-activation: EP (s_t - s_{t-1})/beta vs -sigma'(u_{T-t}) * dL/ds_{T-t+1}",
            "step_index": "t = 1..K: t-th nudged step vs t-th free step counted back from T",
            "excluded_steps": "per layer, steps where the BPTT trace is identically zero (see steps_used)",
        },
        "estimators": results,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / GDU_JSON, json.dumps(_json_safe(report), indent=2) + "\n")
        picks = _pick_units(ref_params, ref_neurons, {**sided, **traces}, param_names, neuron_names,
                            samples, seed)
        if PLOTS_AVAILABLE and picks:
            plot_traces(out / TRACES_PNG, picks, k, beta)
            plot_rmse(out / RMSE_PNG, results)
    return report


def relative_gap(traces: Sequence[Tensor], limit: Sequence[Tensor]) -> float:
    """How far the summed per-step updates ``traces`` are from ``limit``'s, relative to ``limit``'s."""
    gap = sum(float((a.sum(0) - b.sum(0)).square().sum()) for a, b in zip(traces, limit))
    size = sum(float(b.sum(0).square().sum()) for b in limit)
    return math.sqrt(gap / max(size, 1e-300))


def regime_notes(model: EnergyModel, beta: float, converged: bool, residual: float, drift: float,
                 tolerance: float) -> list[str]:
    """One line for each setting under which the theorem's step-by-step match cannot hold."""
    notes = []
    if not converged:
        notes.append(f"the free phase has not converged (residual {residual:.2e}, change over the last K steps "
                     f"{drift:.2e} > {tolerance:g}): the theorem's premise does not hold; give a longer --t1 or "
                     "leave it out")
    if beta > LARGE_BETA:
        notes.append(f"β = {beta:g} is large: EP's updates equal BPTT's gradients to first order in β only; "
                     f"the default {GDU_BETA:g} shows the theorem")
    if not getattr(model.head, "nudge_inside", True):
        notes.append("the output is nudged after σ (model.nudge outside): its σ' enters EP's updates and not "
                     "BPTT's, so they match only roughly; the default nudges inside σ")
    return notes


def converged_t1(model: EnergyModel, x: Tensor, k: int, tolerance: float = CONVERGED) -> int:
    """Free steps long enough for the theorem: plain iteration to ``tolerance``, then K more steps
    (the K steps BPTT goes back through must be at the steady state); at most :data:`MAX_T1`."""
    from ..solvers import build_solver
    with torch.no_grad():
        clamped = model.clamp(x)
        _, stats = build_solver("tolerance", tol=tolerance, check_every=10)(model, clamped, model.init_state(x),
                                                                             MAX_T1 - k)
    return stats.steps + k


def _json_safe(value: Any) -> Any:
    """NaN and inf as null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _pick_units(ref_params: list[Tensor], ref_neurons: list[Tensor], traces: dict[str, Any],
                param_names: list[str], neuron_names: list[str], samples: int, seed: int) -> list[dict]:
    """``samples`` random synapses (weight matrices) and neurons with a nonzero BPTT signal."""
    g = torch.Generator().manual_seed(seed)
    order = ["bptt"] + [n for n in ("one_sided", "one_sided_neg", "symmetric", "vf", "c_ep", "c_vf") if n in traces]
    picks = []
    for kind, refs, names, field in (("synapse", ref_params, param_names, "params"),
                                      ("neuron", ref_neurons, neuron_names, "neurons")):
        live_layers = [i for i, r in enumerate(refs) if bool(r.ne(0).any())]
        if kind == "synapse":  # weight matrices and kernels first, biases only if nothing else
            live_layers = [i for i in live_layers if refs[i].dim() >= 3] or live_layers
        candidates = live_layers
        for _ in range(samples if candidates else 0):
            layer = candidates[int(torch.randint(len(candidates), (1,), generator=g))]
            ref = refs[layer].flatten(1)
            live = torch.nonzero(ref.abs().sum(0) > 0).flatten()
            unit = int(live[int(torch.randint(len(live), (1,), generator=g))])
            curves = {"bptt": ref[:, unit].double().cpu().numpy()}
            for name in order[1:]:
                curves[name] = getattr(traces[name], field)[layer].flatten(1)[:, unit].double().cpu().numpy()
            picks.append({"kind": kind, "title": f"{names[layer]}[{unit}]", "traces": curves})
    return picks


def gradient_angle(model: EnergyModel, estimator: Estimator, x: Tensor, target: Tensor,
                   bptt_steps: int | Literal["all"] | None = None) -> float:
    """Angle (degrees) between ``estimator``'s direction and BPTT's on one batch, all parameters concatenated.

    BPTT runs the estimator's T1 with ``bptt_steps`` (None: T2, "all": T1).
    Runs in eval mode (no dropout, so both see the same network), leaves the
    model unchanged, and restores the estimator's generator so that training
    draws the same random signs as without the call.
    """
    generator = getattr(estimator, "generator", None)
    saved = generator.get_state() if generator is not None else None
    was_training = model.training
    model.eval()
    try:
        direction = estimator.estimate(model, x, target).direction
        reference = BPTT(Phases(estimator.phases.t1, estimator.phases.t2, estimator.phases.beta),
                         bptt_steps=bptt_steps).estimate(model, x, target).direction
    finally:
        model.train(was_training)
        if saved is not None:
            generator.set_state(saved)
    return angle_deg([d.detach() for d in direction], [r.detach() for r in reference])


def gdu_command(config: RunConfig, out_dir: str | Path, *, batch_size: int | None = None, k: int | None = None,
                beta: float | None = None, t1: int | None = None, estimators: Sequence[str] | None = None,
                data_dir: str | Path | None = None, download: bool = False, seed: int | None = None,
                lr: float | Sequence[float] = GDU_LR, dtype: str = "float64",
                checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Build the model of ``config`` and one training batch, run :func:`run_gdu` into ``out_dir``.

    The defaults are the regime of the theorem, whatever the configuration
    trains with: ``beta`` None is :data:`GDU_BETA`; ``t1`` None runs the free
    phase until it has converged (:func:`converged_t1`), then K steps; the
    configuration's ``model.nudge`` is used as given (the command line sets it
    inside unless told otherwise). Other None values take the configuration's:
    ``batch_size`` (train.batch_size), ``k`` (dynamics.t2), ``seed``
    (train.seed: model init, batch draw and plotted units);
    ``estimators`` None: by model kind (see :func:`run_gdu`). ``lr``: C-EP/C-VF
    learning rate; ``dtype``: the check runs in float64 by default (EP's
    finite differences at small β need it); ``checkpoint``: a training
    checkpoint whose weights to check instead of a fresh initialisation.
    No augmentation; the configuration's normalisation and device apply.
    """
    from .. import build
    from ..training.checkpoint import checkpoint_in, load_checkpoint, load_model_state

    seed = config.train.seed if seed is None else int(seed)
    k = config.dynamics.t2 if k is None else int(k)
    beta = GDU_BETA if beta is None else float(beta)
    config = config.model_copy(deep=True)
    config.train.seed = seed
    config.train.batch_size = config.train.batch_size if batch_size is None else int(batch_size)
    config.train.dtype = dtype
    config.data.augment = False
    run = build.build_run(config, data_dir=data_dir, download=download, optimize=False)
    model = run.model
    if checkpoint is not None:
        path = checkpoint_in(Path(checkpoint))
        load_model_state(model, load_checkpoint(path).get("model"), path)
    x, y = next(iter(run.train_loader))
    target = F.one_hot(y, model.head.classes).to(x.dtype)
    t1 = converged_t1(model.eval(), x, k) if t1 is None else int(t1)
    return run_gdu(model, x, target, t1=t1, k=k, beta=beta, estimators=estimators, lr=lr,
                   out_dir=out_dir, seed=seed)
