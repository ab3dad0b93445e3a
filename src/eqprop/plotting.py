"""matplotlib, an optional extra: figures are written when it is installed (``pip install
'eqprop[plots]'``) and left out, with one line saying so, when it is not."""
from __future__ import annotations

try:  # imported with the module: a Ctrl-C never lands inside matplotlib's import mid-run
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

#: True when figures can be drawn
PLOTS_AVAILABLE = Figure is not None
#: what a run says once when they cannot
NO_PLOTS_NOTE = "matplotlib is not installed: no figures are written (pip install 'eqprop[plots]')"
