"""Flatness and robustness analyses (the FPQ paper's Figs. 1-5), each returning plain numbers
that are written as JSON and drawn by `plots`.

- hessian: Tr(H) by Hutchinson, top eigenvalues by power iteration, trace per layer
- gradnorm: ||grad_w L|| of the last backward pass, and of the task loss on a batch
- noise: output variance under Gaussian input noise
- features: per-channel statistics of one layer's output
- tracking: step callbacks that log hessian_trace / grad_norm during training
- step_sizes: weight step sizes per layer and the channels they killed
- sources, reports: finished runs opened for analysis, and the JSON files `flatq plot` draws
"""

from .features import feature_layers, feature_statistics
from .gradnorm import grad_norm, task_grad_norm
from .hessian import Hessian, batch_loss, hessian_report, model_hessian
from .noise import output_variance
from .params import layer_weights, select_params
from .measuring import measuring
from .step_sizes import weight_step_sizes
from .tracking import tracking_callbacks

__all__ = ["Hessian", "batch_loss", "hessian_report", "model_hessian", "grad_norm",
           "task_grad_norm", "output_variance",
           "feature_layers", "feature_statistics", "layer_weights", "select_params",
           "measuring", "tracking_callbacks", "weight_step_sizes"]
