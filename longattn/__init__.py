"""longattn: rewrite softmax attention in traced models into long-context kernels."""
from . import kernels  # noqa: F401  (registers torch.ops.longattn.*)
from .api import clear_reports, explain, last_report, reports, rewrite
from .rewriter.policy import Policy, PolicyError, load_policy
from .rewriter.report import Report

__version__ = "0.1.0"
__all__ = ["explain", "last_report", "reports", "clear_reports", "rewrite", "Policy", "PolicyError", "load_policy", "Report", "__version__"]
