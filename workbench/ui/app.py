"""The browser app: the features of a finished run's SAEs, or of any one SAE, and, for a Switch SAE,
its router.

    workbench browse runs/demo                       # a run's SAEs, at http://127.0.0.1:5006
    workbench browse --sae tests/fixtures/saelens/topk_minilm     # any SAE folder or hub id
    build_app("runs/demo")                           # the same apps in a notebook cell
    build_app(sae="owner/repo", subfolder="layer_8", model="gpt2")

One page: a selector of the SAEs shown (a run's, or the one SAE) and, for the chosen one, a Features
tab (the :class:`~workbench.ui.browser.FeatureBrowser`) and a Router tab (the
:class:`~workbench.ui.router.RouterInspector`, wired to the browser so that choosing an expert lists
that expert's features). Both views run typed prompts through the model the SAE reads.

A run's SAEs are shown from the run's feature index (``workbench index RUN_DIR``); SAEs that have none
yet are indexed first, once, with a progress bar. An SAE from a folder or the hub is indexed on
held-out text of the model and site its metadata records, or that are passed
(:func:`~workbench.eval.any_sae.prepare_sae`), once, into the activation cache. In a served session
every error of a callback is shown at the top of the page, never as a server traceback.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import panel as pn
import param

from .. import io
from ..eval.any_sae import PreparedSAE, prepare_sae, shared_model
from ..eval.features import INFO_FILE, FeatureIndex
from ..eval.prompt import PromptRunner
from ..eval.router import RouterAnalysis, routes_tokens
from ..run import features_dir, index_run, read_run, run_sae_names
from ..saes.base import BaseSAE
from .browser import FeatureBrowser
from .router import RouterInspector

log = logging.getLogger(__name__)


def check_sae_name(run_dir: str | Path, sae: str | None) -> None:
    """Fail, naming the run's SAEs, if ``run_dir`` is no finished run or has no SAE named ``sae``:
    before anything is indexed or loaded."""
    folder = Path(run_dir)
    if (folder / io.CFG_FILE).is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is an SAE folder, not a run folder; browse it with "
                         f"`workbench browse --sae {folder}` (build_app(sae=...))")
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


def sae_views(sae: BaseSAE, index_folder: Path, runner: PromptRunner) -> tuple[FeatureBrowser, Any]:
    """The Features and Router views of one indexed SAE: its browser, and its router inspector (a
    note instead, for an SAE without a router)."""
    browser = FeatureBrowser(FeatureIndex.load(index_folder), runner)
    if not routes_tokens(sae):
        return browser, pn.pane.HTML(
            f'<div class="wb-message">the router view needs a Switch SAE; this is a '
            f'{sae.cfg.architecture} SAE</div>', sizing_mode="stretch_width")
    return browser, RouterInspector(RouterAnalysis.load(index_folder), runner, browser)


class RunSAEs:
    """What the app shows of a finished run: its SAEs by name, each from its folder and index."""

    def __init__(self, run_dir: str | Path, names: list[str]):
        self.run_dir = Path(run_dir)
        self.names = names
        self.title = self.run_dir.name
        data = read_run(run_dir).data
        self.heading = (f"## {html.escape(self.run_dir.name)}\n{data.model.name} at `{data.model.site}`; features "
                        f"indexed on the run's {data.eval_tokens:,} held-out tokens")

    def views(self, name: str) -> tuple[FeatureBrowser, Any]:
        folder = self.run_dir / "saes" / name
        sae = io.load(folder)
        metadata = io.read_config(folder)["metadata"]
        model, tokenizer = shared_model(metadata["model"])
        return sae_views(sae, features_dir(self.run_dir, name),
                         PromptRunner(model, tokenizer, metadata["site"], sae))


class OneSAE:
    """What the app shows of one SAE from a folder or the hub, prepared (indexed) by
    :func:`~workbench.eval.any_sae.prepare_sae`."""

    def __init__(self, prepared: PreparedSAE):
        self.prepared = prepared
        self.names = [prepared.name]
        self.title = prepared.name
        p, cfg = prepared, prepared.sae.cfg
        self.heading = (f"## {html.escape(p.name)}\n{html.escape(p.where)}: a {cfg.architecture} SAE of "
                        f"{cfg.d_sae:,} features reading {html.escape(p.model)} at `{p.site}`; features indexed "
                        f"on {p.eval_tokens:,} held-out tokens of {html.escape(p.text)}")

    def views(self, name: str) -> tuple[FeatureBrowser, Any]:
        return sae_views(self.prepared.sae, self.prepared.index_dir, self.prepared.prompt_runner())


class RunBrowser(pn.viewable.Viewer):
    """The SAEs of ``shown`` (a :class:`RunSAEs` or a :class:`OneSAE`), one at a time: the chosen
    SAE's Features and Router tabs."""

    sae = param.Selector(doc="The SAE shown.")

    def __init__(self, shown: RunSAEs | OneSAE, sae: str | None = None, **params: Any):
        super().__init__(**params)
        self.shown = shown
        self.param.sae.objects = shown.names
        self.sae = sae or shown.names[0]
        self.views: dict[str, tuple[FeatureBrowser, Any]] = {}
        """(feature browser, router view) of each SAE shown so far, kept to switch back quickly."""
        self.message = pn.pane.HTML("", visible=False, sizing_mode="stretch_width")
        """Errors, shown above the tabs."""
        self.tabs = pn.Tabs(dynamic=False, sizing_mode="stretch_width")
        """The shown SAE's Features and Router tabs (none while its folder cannot be shown)."""
        select = pn.widgets.Select.from_param(self.param.sae, name="SAE", width=240)
        self._layout = pn.Column(pn.pane.Markdown(shown.heading), select, self.message, self.tabs,
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
            browser, router = self.views.get(self.sae) or self.shown.views(self.sae)
        except Exception as exc:  # the UI boundary: a broken SAE folder must not take the page down
            self.tabs[:] = []
            self.show_error(exc)
            return
        self.views[self.sae] = (browser, router)
        self.tabs[:] = [("Features", browser), ("Router", router)]


def _prepare(run_dir: str | Path | None, sae: str | None, progress: bool,
             sae_options: dict[str, Any]) -> tuple[Callable[[], RunBrowser], str]:
    """Check and index what is to be shown, before any page is built; returns a maker of its page,
    and its title."""
    if run_dir is None:
        if not sae:
            raise ValueError("nothing to browse: give a run folder (workbench browse RUN_DIR), or an SAE folder "
                             "or hub id (workbench browse --sae PATH_OR_HUB_ID)")
        shown_one = OneSAE(prepare_sae(sae, progress=progress, **sae_options))
        return (lambda: RunBrowser(shown_one)), shown_one.title
    given = sorted(name for name, value in sae_options.items() if value is not None)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} apply to an SAE browsed without a run (--sae PATH_OR_HUB_ID); the SAEs of the run "
                         f"{run_dir} read the run's own model, site and text")
    check_sae_name(run_dir, sae)
    names = ensure_indexed(run_dir, progress)
    return (lambda: RunBrowser(RunSAEs(run_dir, names), sae)), Path(run_dir).name


def build_app(run_dir: str | Path | None = None, sae: str | None = None, progress: bool = True,
              **sae_options: Any) -> RunBrowser:
    """The browser of the run in ``run_dir``, showing its SAE named ``sae`` first (default: the first
    by name); SAEs without a feature index are indexed first.

    Without ``run_dir``, the browser of the one SAE ``sae``: a folder or hub id, indexed first if it
    has not been (``sae_options``: subfolder, model, site, text, eval_tokens, index_dir, as
    :meth:`FeatureBrowser.from_sae <workbench.ui.browser.FeatureBrowser.from_sae>` takes them)."""
    return _prepare(run_dir, sae, progress, sae_options)[0]()


def serve(run_dir: str | Path | None = None, port: int = 5006, address: str = "127.0.0.1", show: bool = False,
          threaded: bool = False, sae: str | None = None, progress: bool = True, **sae_options: Any) -> Any:
    """Serve :func:`build_app` (a run's SAEs, or with ``run_dir`` None the one SAE ``sae``, a folder
    or hub id) at http://address:port/ (this machine only unless ``address`` says otherwise), one app
    per browser tab. Blocks until interrupted unless ``threaded``, which returns the server thread
    (stop it with ``.stop()``). Everything is checked and indexed before serving, so a bad folder or a
    missing model or site fails here, not in the browser."""
    make, title = _prepare(run_dir, sae, progress, sae_options)

    def session() -> RunBrowser:
        app = make()
        pn.config.exception_handler = app.show_error  # set inside the session: applies to it alone
        return app

    what = run_dir if run_dir is not None else sae
    print(f"Browsing {what} at http://{address}:{port}/" + ("" if threaded else "  (Ctrl-C stops it)"),
          flush=True)
    return pn.serve(session, port=port, address=address, show=show, threaded=threaded, verbose=False,
                    title=f"workbench: {title}")
