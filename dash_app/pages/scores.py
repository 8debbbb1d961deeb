"""Scores: how the feature sets compare (visual family quality, agreement with labels, heads)."""

from __future__ import annotations

from pathlib import PurePath

from dash import Dash, html

from dash_app.components import grid, needs
from dash_app.data import current
from dash_app.routes import plot_url

NOTE = ("Silhouette (higher is better, -1..1), Davies-Bouldin (lower is better), "
        "Calinski-Harabasz (higher is better); nmi_/ari_ columns: how well the families agree "
        "with each label (0 = no better than chance, 1 = the same partition).")


def _chosen(summary: dict) -> str:
    """How many families were chosen for a feature set and how, from its summary.json."""
    choice = summary.get("choice", {})
    parts = [f"{summary.get('k')} visual families (k)"]
    if choice.get("method"):
        parts.append(f"chosen by {choice['method']}")
    parts += [f"{label} prefers k = {choice[key]}" for key, label in
              (("silhouette_best_k", "silhouette"), ("gmm_bic_best_k", "GMM BIC"))
              if key in choice]
    return "; ".join(parts) + "."


def weights_name(weights: object) -> str:
    """The weights a feature set was made with, by file name: a page never shows a path on the
    server."""
    if not isinstance(weights, str) or not weights:
        return "none recorded"
    kind, sep, where = weights.partition(" ")
    return f"{kind} {PurePath(where).name}" if sep and "/" in where else PurePath(weights).name


def layout(**_: str) -> html.Div:
    data = current()
    parts: list = [html.H1("How the feature sets compare")]
    if data.comparison is None:
        parts.append(needs("cluster", data))
    else:
        shown = data.comparison.drop(columns=["weights"], errors="ignore")
        parts += [html.P(NOTE, className="hint"), grid(shown, "scores-table")]
    if data.heads is not None:
        parts += [html.H2("Classifier heads (held-out split)"), grid(data.heads, "heads-table")]
    for features, clustering in data.clusterings.items():
        parts += [
            html.H3(f"{features}"),
            html.P([_chosen(clustering.summary), html.Br(),
                    f"Weights: {weights_name(clustering.summary.get('weights'))}"],
                   className="hint"),
            html.Div([html.Img(src=plot_url(features, plot), alt=f"{plot} plot of {features}",
                               className="score-plot")
                      for plot in data.plots(features)],
                     className="score-plots"),
        ]
    return html.Div(parts)


def register(app: Dash) -> None:
    """The scores page is static; it has no callbacks of its own."""
