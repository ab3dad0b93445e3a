"""Figures of the GDU check: traces over t (Laborieux 2021 Fig. 2) and RMSE per layer (matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_write_path
from ..plotting import Figure

#: how each trace is drawn: (label, style kwargs)
STYLES = {
    "bptt": ("-BPTT", {"color": "tab:red", "lw": 2.2}),
    "one_sided": ("one-sided +β", {"color": "black", "ls": "--"}),
    "one_sided_neg": ("one-sided -β", {"color": "black", "ls": ":"}),
    "symmetric": ("symmetric", {"color": "tab:green", "lw": 1.6}),
    "c_ep": ("C-EP", {"color": "tab:blue", "ls": "-.", "marker": ".", "ms": 4}),
    "vf": ("VF", {"color": "tab:purple", "ls": "--"}),
    "c_vf": ("C-VF", {"color": "tab:orange", "ls": "-.", "marker": ".", "ms": 4}),
}


def plot_traces(path: Path, picks: list[dict], k: int, beta: float) -> None:
    """Per-step (top of each pair of rows) and cumulative (bottom, Fig. 2 style) traces of the picks.

    ``picks``: dicts with ``title``, ``kind`` ("synapse" or "neuron") and
    ``traces`` {name: 1-D array over t = 1..K}, including ``"bptt"`` (already negated).
    """
    kinds = [kind for kind in ("synapse", "neuron") if any(p["kind"] == kind for p in picks)]
    columns = max((sum(p["kind"] == kind for p in picks) for kind in kinds), default=1)
    fig = Figure(figsize=(3.4 * columns, 2.6 * 2 * len(kinds)))
    axes = fig.subplots(2 * len(kinds), columns, squeeze=False)
    t = np.arange(1, k + 1)
    for row, kind in enumerate(kinds):
        chosen = [p for p in picks if p["kind"] == kind]
        for col in range(columns):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            if col >= len(chosen):
                top.axis("off")
                bottom.axis("off")
                continue
            pick = chosen[col]
            for name, values in pick["traces"].items():
                label, style = STYLES.get(name, (name, {}))
                top.plot(t, values, label=label, **style)
                bottom.plot(t, np.cumsum(values), label=label, **style)
            top.set_title(pick["title"], fontsize=8)
            top.set_ylabel("per step" if col == 0 else "")
            bottom.set_ylabel("cumulative" if col == 0 else "")
            bottom.set_xlabel("t")
            for ax in (top, bottom):
                ax.axhline(0.0, color="0.8", lw=0.5)
                ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"EP updates vs -BPTT gradients over the nudged phase (β = {beta:g}); "
                 "neurons in pre-activation space (-σ'(u)·∂L/∂s)", fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    with atomic_write_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")


def plot_rmse(path: Path, results: dict[str, dict]) -> None:
    """Grouped bars: RMSE (mean ± std over units) per layer, one bar per estimator, log scale."""
    names = list(results)
    layers = list(next(iter(results.values()))["layers"]) if names else []
    fig = Figure(figsize=(max(6.0, 0.9 * len(layers) * max(1, len(names)) / 2 + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(layers))
    for i, name in enumerate(names):
        means = np.array([results[name]["layers"][layer]["rmse_mean"] for layer in layers])
        stds = np.array([results[name]["layers"][layer]["rmse_std"] for layer in layers])
        label, style = STYLES.get(name, (name, {}))
        color = style.get("color")
        lower = np.minimum(stds, means * 0.999)  # keep the log-scale error bar above zero
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=[lower, stds], label=label,
               color=color, alpha=0.85, capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("RMSE vs BPTT (mean ± std over units)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
