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
or ‖α‖₁ above ``max_coefficient``) or whose residual grew since its previous
iterate takes a plain step g(x_k) instead, and the fallback is counted in the
statistics (on the device, no synchronisation). The phase returns the last map
value g(x_k), a state of the dynamics, whose residual is the one reported.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dynamics import PhaseRunner
from ..models.base import Clamped, EnergyModel, State
from .base import SolverStats, register_solver
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

    config_fields = ("tol", "check_every", "memory", "regularization", "mixing")

    def __init__(self, runner: PhaseRunner | None = None, tol: float = 1e-4, check_every: int = 10,
                 memory: int = 5, regularization: float = 1e-8, mixing: float = 1.0,
                 max_coefficient: float = 1e4) -> None:
        super().__init__(runner, tol, check_every)
        if int(memory) < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if not 0 < mixing <= 1:
            raise ValueError(f"mixing must be in (0, 1], got {mixing}")
        if not max_coefficient > 1:
            raise ValueError(f"max_coefficient must be > 1, got {max_coefficient}")
        self.memory = int(memory)
        self.regularization = float(regularization)
        self.mixing = float(mixing)
        self.max_coefficient = float(max_coefficient)

    def options(self) -> dict[str, object]:
        return {**super().options(), "memory": self.memory, "regularization": self.regularization,
                "mixing": self.mixing, "max_coefficient": self.max_coefficient}

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
        xs = x.new_zeros(batch, m, size)         # the last m iterates x_i (a ring)
        gs = x.new_zeros(batch, m, size)         # their map values g(x_i)
        fallbacks = torch.zeros((), dtype=torch.int64, device=x.device)
        previous = None                          # the last residual, per sample
        for k in range(1, steps + 1):
            mapped = self.runner(model, clamped, flat.unflatten(x), 1, beta, target)
            g = flat.flatten(mapped)
            residual = (g - x).abs().amax(dim=1)
            if k == steps or k % self.check_every == 0:
                converged = bool(residual.max() <= self.tol)  # one synchronisation per check
                if converged or k == steps:
                    return mapped, SolverStats(k, residual, converged, fallbacks)
            slot = (k - 1) % m
            xs[:, slot], gs[:, slot] = x, g
            n = min(k, m)
            extrapolated, bad = self._extrapolate(xs[:, :n], gs[:, :n])
            if previous is not None:
                bad |= residual > previous
            if n > 1:
                fallbacks += bad.sum()
            x = torch.where(bad.unsqueeze(1), g, extrapolated)
            previous = residual
        raise AssertionError("unreachable: the loop returns at its last step")

    def _extrapolate(self, xs: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
        """The Anderson iterate from ``n`` stored pairs ``[B, n, D]``, and per sample whether its
        system was ill-conditioned."""
        batch, n, _ = xs.shape
        residuals = gs - xs
        gram = torch.bmm(residuals, residuals.transpose(1, 2))                  # [B, n, n]
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(gram.dtype).tiny)
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
        gram = gram + (self.regularization * scale).view(batch, 1, 1) * eye
        ones = gram.new_ones(batch, n, 1)
        z, info = torch.linalg.solve_ex(gram, ones)
        alpha = (z / z.sum(dim=1, keepdim=True)).squeeze(2)                    # [B, n], Σ α = 1
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1) | (alpha.abs().sum(dim=1) > self.max_coefficient)
        alpha = torch.where(bad.unsqueeze(1), torch.zeros_like(alpha), alpha)  # no NaN into the mix
        mixed = torch.bmm(alpha.unsqueeze(1), gs).squeeze(1)
        if self.mixing != 1.0:
            mixed = self.mixing * mixed + (1.0 - self.mixing) * torch.bmm(alpha.unsqueeze(1), xs).squeeze(1)
        return mixed, bad
