"""The GDU theorem check: EP's per-step updates against BPTT's per-step gradients (SPEC §5).

``run_gdu(model, x, target, ...)`` for any model and estimator of the
package; ``gdu_command(config, out_dir, ...)`` for the command line;
``gradient_angle(model, estimator, x, target, bptt_steps)`` for training logs.
"""
from .bptt_steps import BPTTSteps, bptt_step_grads
from .ep_steps import EP_ESTIMATORS, StepTraces, ep_step_updates
from .metrics import active_steps, angle_deg, layer_metrics, sign_agreement, unit_rmse
from .run import gdu_command, gradient_angle, run_gdu

__all__ = ["BPTTSteps", "EP_ESTIMATORS", "StepTraces", "active_steps", "angle_deg", "bptt_step_grads",
           "ep_step_updates", "gdu_command", "gradient_angle", "layer_metrics", "run_gdu",
           "sign_agreement", "unit_rmse"]
