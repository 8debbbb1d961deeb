"""Scores: how the feature sets compare (cluster quality, agreement with labels, heads)."""

from __future__ import annotations

import pandas as pd
from dash import Dash, dash_table, html

from dash_app.data import RunData
from dash_app.routes import PLOTS, plot_url

NOTE = ("Silhouette (higher is better, -1..1), Davies-Bouldin (lower is better), "
        "Calinski-Harabasz (higher is better); nmi_/ari_ columns: how well the clusters agree "
        "with each label (0 = no better than chance, 1 = the same partition).")


def table(frame: pd.DataFrame, table_id: str) -> dash_table.DataTable:
    """A sortable table with numbers rounded for reading."""
    shown = frame.copy()
    for column in shown.select_dtypes("number").columns:
        if not pd.api.types.is_integer_dtype(shown[column]):
            shown[column] = shown[column].round(3)
    return dash_table.DataTable(
        shown.to_dict("records"), [{"name": c, "id": c} for c in shown.columns], id=table_id,
        sort_action="native", style_table={"overflowX": "auto"},
        style_cell={"fontFamily": "inherit", "fontSize": 13, "padding": "4px 8px"},
        style_header={"fontWeight": "bold", "backgroundColor": "#f3f3f3"},
        style_cell_conditional=[{"if": {"column_id": c}, "textAlign": "left"}
                                for c in shown.select_dtypes(exclude="number").columns])


def _chosen(summary: dict) -> str:
    """How many clusters were chosen for a feature set and how, from its summary.json."""
    choice = summary.get("choice", {})
    parts = [f"k = {summary.get('k')}"]
    if choice.get("method"):
        parts.append(f"chosen by {choice['method']}")
    parts += [f"{label} prefers k = {choice[key]}" for key, label in
              (("silhouette_best_k", "silhouette"), ("gmm_bic_best_k", "GMM BIC"))
              if key in choice]
    return "; ".join(parts) + "."


def layout(data: RunData) -> html.Div:
    parts: list = [html.H2("How the feature sets compare")]
    if data.comparison is None:
        parts.append(html.P("No clusters/comparison.csv in this run: run the cluster stage.",
                            className="message info"))
    else:
        shown = data.comparison.drop(columns=["weights"], errors="ignore")
        parts += [html.P(NOTE, className="hint"), table(shown, "scores-table")]
    if data.heads is not None:
        parts += [html.H2("Classifier heads (held-out split)"), table(data.heads, "heads-table")]
    for features, clustering in data.clusterings.items():
        parts += [
            html.H3(f"{features}"),
            html.P([_chosen(clustering.summary), html.Br(),
                    f"Weights: {clustering.summary.get('weights', 'unknown')}"], className="hint"),
            html.Div([html.Img(src=plot_url(features, plot), alt=f"{plot} plot of {features}",
                               className="score-plot")
                      for plot in PLOTS
                      if (data.run.clusters_dir / features / f"{plot}.png").is_file()],
                     className="score-plots"),
        ]
    return html.Div(parts)


def register(app: Dash, data: RunData) -> None:
    """The scores page is static; it has no callbacks of its own."""
