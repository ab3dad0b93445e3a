"""``anderson``: Anderson acceleration of the fixed-point map s ↦ step(s), per sample.

Each sample keeps its last ``memory`` iterates x_i and map values g(x_i); the
next iterate mixes them with the weights α that minimise ‖Σ α_i (g(x_i) - x_i)‖
subject to Σ α_i = 1:

    x_{k+1} = mixing · Σ α_i g(x_i) + (1 - mixing) · Σ α_i x_i.

α solves ``(R Rᵀ + λ' I) z = 1``, ``α = z / Σ z``, with R the residuals. The
regularisation is relative, ``λ' = regularization · tr(R Rᵀ) / m``: EP's
residuals are 1e-3 and below, where an absolute λ (the usual 1e-4) swamps the
system and Anderson becomes slower than plain iteration.

Safeguard: a sample whose system is ill-conditioned (singular, non-finite α,
or ‖α‖₁ above ``max_coefficient``) or whose residual grew more than ``growth``
times since its previous iterate takes a plain step g(x_k) instead and starts
its history again; a sample whose residual has not improved on its best for
``stall`` steps (default 4 x memory) takes plain steps only from then on
(Anderson can stall near a point where plain iteration is still in a long
transient). Every plain step taken so is counted in the statistics (on the
device, no synchronisation).
Anderson's residuals are not monotone: a strict ``growth`` of 1 made a third
of the steps plain ones on a trained EP-2h network without saving any. The
phase returns the last map value g(x_k), a state of the dynamics, whose
residual is the one reported.

The map is one synchronous step, or with ``sweep="alternating"`` one sweep of
even then odd layers (:func:`~eqprop.dynamics.run_alternating`), itself a
faster contraction for layered networks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dynamics import PhaseRunner
from ..models.base import Clamped, EnergyModel, State
from .base import EAGER_RUNNERS, SolverStats, Sweep, register_solver
from .tolerance import Tolerance


class _Flat:
    """A state as one ``[B, D]`` matrix and back, each layer in its own memory order (a
    channels-last conv state stays channels-last: no copies on the way in or out)."""

    def __init__(self, state: State) -> None:
        self.shapes = [s.shape for s in state]
        self.channels_last = [s.dim() == 4 and not s.is_contiguous()
                              and s.is_contiguous(memory_format=torch.channels_last) for s in state]
        self.sizes = [s[0].numel() for s in state]

    def flatten(self, state: State) -> Tensor:
        return torch.cat([(s.permute(0, 2, 3, 1) if last else s).reshape(s.shape[0], -1)
                          for s, last in zip(state, self.channels_last)], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        state = []
        for part, shape, last in zip(flat.split(self.sizes, dim=1), self.shapes, self.channels_last):
            if last:
                b, c, h, w = shape
                state.append(part.reshape(b, h, w, c).permute(0, 3, 1, 2))
            else:
                state.append(part.reshape(shape))
        return state


@register_solver("anderson")
class Anderson(Tolerance):
    """Anderson acceleration with a relative regularisation and a plain-step safeguard."""

    config_fields = ("tol", "check_every", "memory", "regularization", "mixing", "sweep")

    def __init__(self, runner: PhaseRunner | None = None, tol: float = 1e-4, check_every: int = 10,
                 memory: int = 5, regularization: float = 1e-8, mixing: float = 1.0,
                 max_coefficient: float = 1e4, growth: float = 2.0, stall: int | None = None,
                 sweep: Sweep = "synchronous") -> None:
        if sweep not in EAGER_RUNNERS:
            raise ValueError(f"sweep must be one of {', '.join(EAGER_RUNNERS)}, got {sweep!r}")
        self.sweep = sweep  # the map: set before the base class picks the eager runner of it
        super().__init__(runner, tol, check_every)
        if int(memory) < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if not 0 < mixing <= 1:
            raise ValueError(f"mixing must be in (0, 1], got {mixing}")
        if not max_coefficient > 1:
            raise ValueError(f"max_coefficient must be > 1, got {max_coefficient}")
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1, got {growth}")
        self.memory = int(memory)
        self.regularization = float(regularization)
        self.mixing = float(mixing)
        self.max_coefficient = float(max_coefficient)
        self.growth = float(growth)
        self.stall = 4 * self.memory if stall is None else int(stall)
        if self.stall < 1:
            raise ValueError(f"stall must be >= 1, got {stall}")

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> tuple[State, SolverStats]:
        if steps <= 0:
            return state, SolverStats(0, state[0].new_zeros(state[0].shape[0]), True)
        with torch.no_grad():
            return self._solve(model, clamped, state, steps, beta, target)

    def _solve(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
               beta: float | Tensor, target: Tensor | None) -> tuple[State, SolverStats]:
        flat = _Flat(state)
        x = flat.flatten(state)
        batch, size = x.shape
        m = self.memory
        # per sample, rings of the last m map values g(x_i), residuals f_i = g(x_i) - x_i and their
        # Gram matrix f_i · f_j (one new row per step, not the whole product)
        gs = x.new_zeros(batch, m, size)
        fs = x.new_zeros(batch, m, size)
        gram = x.new_zeros(batch, m, m)
        valid = torch.zeros(batch, m, dtype=torch.bool, device=x.device)   # slots in use
        fallbacks = torch.zeros((), dtype=torch.int64, device=x.device)
        previous = None                          # the last residual, per sample
        best = torch.full((batch,), torch.inf, dtype=x.dtype, device=x.device)
        stalled = torch.zeros(batch, dtype=torch.int64, device=x.device)      # steps since the best
        plain_only = torch.zeros(batch, dtype=torch.bool, device=x.device)
        for k in range(1, steps + 1):
            mapped = self.runner(model, clamped, flat.unflatten(x), 1, beta, target)
            g = flat.flatten(mapped)
            f = g - x
            residual = f.abs().amax(dim=1)
            if k == steps or k % self.check_every == 0:
                converged = bool(residual.max() <= self.tol)  # one synchronisation per check
                if converged or k == steps:
                    return mapped, SolverStats(k, residual, converged, fallbacks)
            if previous is None:
                grew = torch.zeros_like(residual, dtype=torch.bool)
            else:  # a sample whose residual grew starts its history again from this pair
                grew = residual > self.growth * previous
                valid &= ~grew.unsqueeze(1)
            improved = residual < best
            best = torch.where(improved, residual, best)
            stalled = torch.where(improved, 0, stalled + 1)
            plain_only |= stalled >= self.stall
            slot = (k - 1) % m
            gs[:, slot], fs[:, slot] = g, f
            dots = (fs * f.unsqueeze(1)).sum(dim=2)   # [B, m]; 5x faster than bmm's matrix-vector on a CPU
            gram[:, slot, :], gram[:, :, slot] = dots, dots
            valid[:, slot] = True
            extrapolated, bad = self._extrapolate(gs, fs, gram, valid)
            bad |= grew | plain_only
            fallbacks += bad.sum()
            valid &= ~bad.unsqueeze(1)
            valid[:, slot] = True
            x = torch.where(bad.unsqueeze(1), g, extrapolated)
            previous = residual
        raise AssertionError("unreachable: the loop returns at its last step")

    def _extrapolate(self, gs: Tensor, fs: Tensor, gram: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The Anderson iterate from the stored map values and residuals ``[B, m, D]`` whose slots
        are ``valid`` (``[B, m]``), and per sample whether its system was ill-conditioned."""
        use = valid.to(gs.dtype)
        pairs = use.unsqueeze(2) * use.unsqueeze(1)
        counts = use.sum(dim=1)
        scale = ((gram.diagonal(dim1=1, dim2=2) * use).sum(dim=1) / counts).clamp_min(torch.finfo(gs.dtype).tiny)
        # unused slots get the row e_i and a right-hand side 0: their weight is exactly 0
        diagonal = self.regularization * scale.unsqueeze(1) * use + (1.0 - use)
        z, info = torch.linalg.solve_ex(gram * pairs + torch.diag_embed(diagonal), use.unsqueeze(2))
        alpha = (z / z.sum(dim=1, keepdim=True)).squeeze(2)                    # [B, m], Σ α = 1
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1) | (alpha.abs().sum(dim=1) > self.max_coefficient)
        bad &= counts > 1   # one pair: the plain step itself, nothing to fall back from
        alpha = torch.where(bad.unsqueeze(1), torch.zeros_like(alpha), alpha).unsqueeze(1)  # no NaN into the mix
        mixed = torch.bmm(alpha, gs).squeeze(1)
        if self.mixing != 1.0:   # Σ α x_i = Σ α (g_i - f_i)
            mixed = mixed - (1.0 - self.mixing) * torch.bmm(alpha, fs).squeeze(1)
        return mixed, bad
