"""Panel views of training and of trained SAEs: live curves, the feature browser, the router.

In a notebook, load Panel's JavaScript first with ``pn.extension("tabulator")`` (the feature table
is a Tabulator widget); ``workbench browse RUN_DIR`` needs nothing.
"""
from .app import build_app, serve
from .browser import FeatureBrowser
from .dashboard import TrainingDashboard
from .router import RouterInspector

__all__ = ["FeatureBrowser", "RouterInspector", "TrainingDashboard", "build_app", "serve"]
