"""The browser app of a finished run: its SAEs' features and, for a Switch SAE, its router.

    workbench browse runs/demo              # serves http://127.0.0.1:5006
    build_app("runs/demo")                  # the same app in a notebook cell

One page per run: a selector of the run's SAEs and, for the chosen one, a Features tab (the
:class:`~workbench.ui.browser.FeatureBrowser`) and a Router tab (the
:class:`~workbench.ui.router.RouterInspector`, wired to the browser so that choosing an expert lists
that expert's features). Both views run typed prompts through the model the SAE was trained on.

What they show comes from the run's feature index (``workbench index RUN_DIR``); SAEs that have none
yet are indexed first, once, with a progress bar. In a served session every error of a callback is
shown at the top of the page, never as a server traceback.
"""
from __future__ import annotations

import html
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import panel as pn
import param

from .. import io
from ..data.embedded import load_model
from ..data.sites import resolve_site
from ..eval.features import INFO_FILE, FeatureIndex
from ..eval.prompt import PromptRunner
from ..eval.router import RouterAnalysis, routes_tokens
from ..run import features_dir, index_run, read_run, run_sae_names
from .browser import FeatureBrowser
from .router import RouterInspector

log = logging.getLogger(__name__)


def check_sae_name(run_dir: str | Path, sae: str | None) -> None:
    """Fail, naming the run's SAEs, if ``run_dir`` is no finished run or has no SAE named ``sae``:
    before anything is indexed or loaded."""
    read_run(run_dir)
    run_sae_names(run_dir, [sae] if sae else None)


def ensure_indexed(run_dir: str | Path, progress: bool = True) -> list[str]:
    """The names of the run's SAEs, after indexing those that have no feature index yet."""
    read_run(run_dir)
    names = run_sae_names(run_dir)
    missing = [name for name in names if not (features_dir(run_dir, name) / INFO_FILE).is_file()]
    if missing:
        print(f"Indexing {', '.join(missing)} on the run's held-out activations (once; saved under "
              f"{Path(run_dir) / 'features'})...", flush=True)
        index_run(run_dir, missing, progress=progress)
    return names


@lru_cache(maxsize=2)
def _model(name: str) -> tuple[Any, Any]:
    """The model and tokenizer an SAE was trained on, loaded once per process: every SAE of a run,
    and every browser session, shares them (they are only read)."""
    return load_model(name)


class RunBrowser(pn.viewable.Viewer):
    """A run's SAEs, one at a time: the chosen SAE's Features and Router tabs."""

    sae = param.Selector(doc="The SAE shown.")

    def __init__(self, run_dir: str | Path, names: list[str], sae: str | None = None, **params: Any):
        super().__init__(**params)
        self.run_dir = Path(run_dir)
        self.param.sae.objects = names
        self.sae = sae or names[0]
        self.views: dict[str, tuple[FeatureBrowser, Any]] = {}
        """(feature browser, router view) of each SAE shown so far, kept to switch back quickly."""
        self.message = pn.pane.HTML("", visible=False, sizing_mode="stretch_width")
        """Errors, shown above the tabs."""
        self.tabs = pn.Tabs(dynamic=False, sizing_mode="stretch_width")
        """The shown SAE's Features and Router tabs (none while its folder cannot be shown)."""
        select = pn.widgets.Select.from_param(self.param.sae, name="SAE", width=240)
        data = read_run(run_dir).data
        heading = (f"## {html.escape(self.run_dir.name)}\n{data.model.name} at `{data.model.site}`; features "
                   f"indexed on the run's {data.eval_tokens:,} held-out tokens")
        self._layout = pn.Column(pn.pane.Markdown(heading), select, self.message, self.tabs,
                                 sizing_mode="stretch_width")
        self._show()
        self.param.watch(lambda event: self._show(), "sae")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def show_error(self, exc: BaseException) -> None:
        """Put ``exc``'s message at the top of the page (the served app's exception handler)."""
        log.warning("browse: %s: %s", type(exc).__name__, exc)
        self.message.object = (f'<div class="wb-message wb-error" style="color:#a00">'
                               f'{html.escape(str(exc) or type(exc).__name__)}</div>')
        self.message.visible = True

    def _show(self) -> None:
        self.message.visible = False
        try:
            browser, router = self.views.get(self.sae) or self._build(self.sae)
        except Exception as exc:  # the UI boundary: a broken SAE folder must not take the page down
            self.tabs[:] = []
            self.show_error(exc)
            return
        self.views[self.sae] = (browser, router)
        self.tabs[:] = [("Features", browser), ("Router", router)]

    def _build(self, name: str) -> tuple[FeatureBrowser, Any]:
        folder = self.run_dir / "saes" / name
        sae = io.load(folder)
        metadata = io.read_config(folder)["metadata"]
        model, tokenizer = _model(metadata["model"])
        runner = PromptRunner(model, tokenizer, resolve_site(model, metadata["site"]), sae)
        index_folder = features_dir(self.run_dir, name)
        browser = FeatureBrowser(FeatureIndex.load(index_folder), runner)
        if not routes_tokens(sae):
            return browser, pn.pane.HTML(
                f'<div class="wb-message">the router view needs a Switch SAE; this is a '
                f'{sae.cfg.architecture} SAE</div>', sizing_mode="stretch_width")
        return browser, RouterInspector(RouterAnalysis.load(index_folder), runner, browser)


def build_app(run_dir: str | Path, sae: str | None = None, progress: bool = True) -> RunBrowser:
    """The browser of the run in ``run_dir``, showing ``sae`` first (default: the first by name);
    SAEs without a feature index are indexed first."""
    check_sae_name(run_dir, sae)
    return RunBrowser(run_dir, ensure_indexed(run_dir, progress), sae)


def serve(run_dir: str | Path, port: int = 5006, address: str = "127.0.0.1", show: bool = False,
          threaded: bool = False, sae: str | None = None, progress: bool = True) -> Any:
    """Serve :func:`build_app` at http://address:port/ (this machine only unless ``address`` says
    otherwise), one app per browser tab. Blocks until interrupted unless ``threaded``, which returns
    the server thread (stop it with ``.stop()``). The run is checked and indexed before serving, so
    a bad folder fails here, not in the browser."""
    check_sae_name(run_dir, sae)
    names = ensure_indexed(run_dir, progress)

    def session() -> RunBrowser:
        app = RunBrowser(run_dir, names, sae)
        pn.config.exception_handler = app.show_error  # set inside the session: applies to it alone
        return app

    print(f"Browsing {run_dir} at http://{address}:{port}/" + ("" if threaded else "  (Ctrl-C stops it)"),
          flush=True)
    return pn.serve(session, port=port, address=address, show=show, threaded=threaded, verbose=False,
                    title=f"workbench: {Path(run_dir).name}")
