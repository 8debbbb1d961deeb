"""Heads: how well one trained head does on the held-out paintings, as `train` stored it.

For a target and feature set: its held-out metrics, a sortable per-class (per-label) table, the
confusion matrix as a heat map whose cells list the paintings behind them, the most confidently
wrong paintings, the classes that need more images, and for a multi-label head a threshold
slider per label reading precision and recall from the stored precision-recall curve. Nothing
is refitted or predicted again: every figure is read from the head's files
(influence.readers.load_evaluation).
"""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import plotly.graph_objects as go
from dash import MATCH, Dash, Input, Output, State, ctx, dcc, html, no_update

from dash_app import checks
from dash_app.components import chart, gallery, grid, message, needs, tidy
from dash_app.data import RunData, current
from influence.readers import HeadEvaluation
from influence.runs import InfluenceError

#: How the outcomes of a multi-label head's label are shown in its heat map (the true negatives,
#: most of every row, are left out).
OUTCOME_NAMES = {"tp": "right (true positive)", "fn": "missed (false negative)",
                 "fp": "wrongly given (false positive)"}
#: Paintings listed for a clicked cell, and confidently wrong paintings shown.
CELL_SHOWN = 48
WRONG_SHOWN = 24
#: Classes listed in each "needs more images" ranking; a longer per-class table scrolls.
NEEDY = 10
TABLE_ROWS = 12


def head_href(target: str, features: str) -> str:
    """The page of one head."""
    return "/heads?" + urlencode({"target": target, "features": features})


def _pick(data: RunData, target: object, features: object) -> tuple[str, str] | None:
    """The head asked for if the run has it, else the target's first feature set, else the
    first head; None without heads."""
    heads = [(i["target"], i["features"]) for i in data.head_info]
    if not heads:
        return None
    if (target, features) in heads:
        return target, features  # type: ignore[return-value]
    return next((h for h in heads if h[0] == target), heads[0])


def layout(target: str | None = None, features: str | None = None, **_: str) -> html.Div:
    data = current()
    picked = _pick(data, target, features)
    if picked is None:
        return needs("train", data)
    target, features = picked
    try:
        evaluation = data.evaluation(target, features)
    except InfluenceError as e:
        return message(str(e), "error")
    targets = list(dict.fromkeys(i["target"] for i in data.head_info))
    sets = [i["features"] for i in data.head_info if i["target"] == target]
    return html.Div([
        html.Div([
            html.Label(["Head (target)", dcc.Dropdown(targets, target, id="heads-target",
                                                      clearable=False)]),
            html.Label(["Feature set", dcc.Dropdown(sets, features, id="heads-features",
                                                    clearable=False)]),
        ], className="controls"),
        *detail(data, evaluation),
    ])


def metrics(info: dict) -> list:
    """The head's held-out figures, as tiles."""
    def pct(key: str) -> str:
        return "—" if info.get(key) is None else f"{info[key]:.1%}"

    if info.get("multi_label"):
        shown = [("subset accuracy", pct("accuracy")), ("micro F1", pct("micro_f1")),
                 ("macro precision", pct("macro_precision")),
                 ("macro recall", pct("macro_recall")), ("macro F1", pct("macro_f1")),
                 ("mean average precision", pct("macro_average_precision"))]
    else:
        shown = [("accuracy", pct("accuracy")), ("macro precision", pct("macro_precision")),
                 ("macro recall", pct("macro_recall")), ("macro F1", pct("macro_f1")),
                 (f"top-{info.get('top_k', 5)} accuracy", pct("top5_accuracy")),
                 ("calibration error", "—" if info.get("ece") is None else f"{info['ece']:.3f}")]
    return [html.Div([html.Div(value, className="metric-value"),
                      html.Div(name, className="metric-name")], className="metric")
            for name, value in shown]


def detail(data: RunData, evaluation: HeadEvaluation) -> list:
    info = evaluation.info
    kind = "multi-label" if evaluation.multi_label else "single-label"
    about = (f"A {kind} {info.get('head')} head on the {info['features']} features: "
             f"{info.get('n_train', 0):,} training paintings, judged on {info.get('n_test', 0):,} "
             f"held-out ones and {len(evaluation.classes)} labels")
    if evaluation.multi_label:
        about += f"; each label's threshold is {info.get('threshold_rule', 'recorded')}"
    parts: list = [
        html.H2(f"{info['target']} from {info['features']}", id="heads-title"),
        html.P(about + ".", className="hint"),
        html.Div(metrics(info), className="metrics", id="heads-metrics"),
        html.H3("Per label" if evaluation.multi_label else "Per class"),
        html.P("Held-out precision, recall and F1; n_train: paintings it learnt from. "
               "Click a column to sort.", className="hint"),
        grid(evaluation.per_class, "heads-per-class",
             height=420 if len(evaluation.per_class) > TABLE_ROWS else None),
    ]
    if evaluation.multi_label:
        parts += thresholds(evaluation)
    parts += [
        html.H3("Confusion matrix (held-out paintings)"),
        html.P("Colour: the share of the row; click a cell to see its paintings.",
               className="hint"),
        chart(confusion_figure(evaluation), id="heads-confusion"),
        dcc.Loading(html.Div(message("Click a cell of the matrix to list its paintings."),
                             id="heads-cell"), delay_show=200),
        *largest_losses(data, evaluation),
        *needing_more(evaluation),
    ]
    return parts


def confusion_figure(evaluation: HeadEvaluation) -> go.Figure:
    """The stored confusion counts as a heat map: true x predicted labels, or label x outcome
    (OUTCOME_NAMES) for a multi-label head; coloured by share of the row, written as counts."""
    classes = evaluation.classes
    if evaluation.multi_label:
        stored = evaluation.confusion.reindex(classes)
        counts = stored[list(OUTCOME_NAMES)].to_numpy(dtype=float)
        columns = list(OUTCOME_NAMES.values())
        x_title, y_title = "outcome", "label"
    else:
        counts = evaluation.confusion.reindex(index=classes, columns=classes).to_numpy(
            dtype=float)
        columns = classes
        x_title, y_title = "predicted", "true"
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = go.Figure(go.Heatmap(
        z=share, x=columns, y=classes, text=counts.astype(int), texttemplate="%{text}",
        colorscale="Blues", zmin=0, zmax=1, xgap=1, ygap=1,
        colorbar={"title": "share", "tickformat": ".0%"},
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{text}} paintings "
                      "(%{z:.0%} of the row)<extra></extra>"))
    fig = tidy(fig, None, min(120 + 26 * len(classes), 2400))
    fig.update_xaxes(title=x_title, side="top", tickangle=-40 if len(columns) > 6 else 0)
    return fig.update_yaxes(title=y_title, autorange="reversed")


def cell_list(data: RunData, evaluation: HeadEvaluation, row: str, column: str) -> list:
    """The held-out paintings behind one cell of the matrix."""
    found = evaluation.cell(row, column)
    if evaluation.multi_label:
        title = f"{row}: {OUTCOME_NAMES[column]}"
        notes = [f"p({row}) {p:.2f}" for p in found["p"]]
    else:
        title = f"True {row}, predicted {column}"
        notes = [f"p({column}) {p:.2f}" for p in found["p"]]
    head = html.H3(f"{title}: {len(found):,} held-out painting{'s' * (len(found) != 1)}",
                   id="heads-cell-title")
    if found.empty:
        return [head]
    shown = found.head(CELL_SHOWN)
    more = ([html.P(f"The {CELL_SHOWN} most probable shown.", className="hint")]
            if len(found) > CELL_SHOWN else [])
    return [head, *more, gallery(data, shown["image_id"], notes[:CELL_SHOWN], small=True,
                                 id="heads-cell-gallery")]


def largest_losses(data: RunData, evaluation: HeadEvaluation) -> list:
    """The most confidently wrong held-out paintings, with their true and predicted labels."""
    head = [html.H3("Most confidently wrong (largest losses)"),
            html.P("Held-out paintings the head was surest about and wrong: often a label to "
                   "correct, or a painting unlike its class.", className="hint")]
    wrong = evaluation.wrong
    if wrong is None:
        return [*head, message("This head was trained before its wrong paintings were stored: "
                               "run `train` again.")]
    if wrong.empty:
        return [*head, message("The head got every held-out painting right.")]
    wrong = wrong[wrong["image_id"].map(data.row_of).notna()].head(WRONG_SHOWN)
    truth = f"true_{evaluation.info['target']}"
    if evaluation.multi_label:
        notes = [f"{'missed' if m == 'missed' else 'wrongly'} {label} (p {p:.2f}) · "
                 f"true: {t or 'none'} · predicted: {pr or 'none'}"
                 for m, label, p, t, pr in zip(wrong["mistake"], wrong["label"], wrong["p"],
                                               wrong[truth].fillna(""),
                                               wrong["predicted"].fillna(""), strict=True)]
    else:
        notes = [f"true {t} · predicted {pr} (p {p:.2f})"
                 for t, pr, p in zip(wrong[truth], wrong["predicted"], wrong["p_predicted"],
                                     strict=True)]
    return [*head, gallery(data, wrong["image_id"], notes, id="heads-wrong")]


def needing_more(evaluation: HeadEvaluation) -> list:
    """Classes that need more images: the fewest training paintings and the lowest held-out
    recall, and the labels left out as too small."""
    table = evaluation.per_class
    columns = [c for c in ("label", "n_train", "support", "recall", "f1") if c in table]
    fewest = table.sort_values(["n_train", "recall"], kind="stable")[columns].head(NEEDY)
    judged = table[table["support"] > 0] if "support" in table else table
    weakest = judged.sort_values(["recall", "n_train"], kind="stable")[columns].head(NEEDY)
    dropped = evaluation.info.get("dropped_classes") or {}
    parts: list = [html.H3("Classes that need more images"),
                   html.P("support: held-out paintings; n_train: paintings it learnt from (a "
                          "label without held-out paintings has no recall to rank).",
                          className="hint"),
                   html.Div([html.Div([html.H4("Fewest training paintings"),
                                       grid(fewest, "heads-fewest")]),
                             html.Div([html.H4("Lowest held-out recall"),
                                       grid(weakest, "heads-weakest")])],
                            className="two-columns")]
    if dropped:
        listed = ", ".join(f"{label} ({n})" for label, n in list(dropped.items())[:30])
        parts.append(html.P(f"Left out for having fewer than "
                            f"{evaluation.info.get('min_per_class')} labelled paintings (or none "
                            f"to train on): {listed}{', …' if len(dropped) > 30 else ''}.",
                            className="hint", id="heads-dropped"))
    return parts


def readout(evaluation: HeadEvaluation, label: str, threshold: float) -> str:
    """A label's held-out precision and recall at a threshold, from its stored curve."""
    point = evaluation.at_threshold(label, threshold)
    if point["recall"] is None:
        return "no positive held-out painting: no curve"
    precision = "—" if point["precision"] is None else f"{point['precision']:.2f}"
    return f"at {threshold:.3f}: precision {precision} · recall {point['recall']:.2f}"


def thresholds(evaluation: HeadEvaluation) -> list:
    """A slider per label over its threshold, with the held-out precision and recall there."""
    rows = []
    for label, chosen in zip(evaluation.classes, evaluation.thresholds, strict=True):
        key, shown = {"label": label}, round(float(chosen), 3)
        rows.append(html.Div([
            html.Div(label, className="threshold-label", title=label),
            dcc.Slider(0, 1, 0.001, value=shown, marks={0: "0", shown: "chosen", 1: "1"},
                       updatemode="drag", id={"type": "heads-threshold", **key},
                       className="threshold-slider"),
            html.Div(readout(evaluation, label, float(chosen)),
                     id={"type": "heads-threshold-readout", **key},
                     className="threshold-readout"),
        ], className="threshold-row"))
    return [html.H3("Thresholds"),
            html.P("Move a label's threshold to see its held-out precision and recall there, "
                   "read from the stored precision-recall curve (the head keeps its chosen "
                   "threshold).", className="hint"),
            html.Div(rows, id="heads-thresholds")]


def _loaded(data: RunData, target: object, features: object) -> HeadEvaluation | None:
    """A callback's head: None for one the run does not have or cannot read."""
    try:
        return data.evaluation(target, features)
    except InfluenceError:
        return None


def register(app: Dash) -> None:
    @app.callback(Output("heads-features", "options"), Output("heads-features", "value"),
                  Input("heads-target", "value"), State("heads-features", "value"),
                  prevent_initial_call=True)
    def feature_sets(target: object, features: object) -> tuple:
        sets = [i["features"] for i in current().head_info if i["target"] == target]
        if not sets:
            return no_update, no_update
        return sets, features if features in sets else sets[0]

    @app.callback(Output("url", "href", allow_duplicate=True), Input("heads-features", "value"),
                  State("heads-target", "value"), prevent_initial_call=True)
    def open_head(features: object, target: object) -> str:
        picked = _pick(current(), target, features)
        if picked is None or picked != (target, features):
            return no_update
        return head_href(*picked)

    @app.callback(Output("heads-cell", "children"), Input("heads-confusion", "clickData"),
                  State("heads-target", "value"), State("heads-features", "value"),
                  prevent_initial_call=True)
    def show_cell(click: object, target: object, features: object) -> list:
        data = current()
        evaluation = _loaded(data, target, features)
        point = checks.first_point(click)
        if evaluation is None or not point:
            return no_update
        row = checks.one_of(point.get("y"), evaluation.classes, None)
        names = {v: k for k, v in OUTCOME_NAMES.items()}
        column = (checks.one_of(point.get("x"), names, None) if evaluation.multi_label
                  else checks.one_of(point.get("x"), evaluation.classes, None))
        if row is None or column is None:
            return no_update
        return cell_list(data, evaluation, row,
                         names[column] if evaluation.multi_label else column)

    @app.callback(Output({"type": "heads-threshold-readout", "label": MATCH}, "children"),
                  Input({"type": "heads-threshold", "label": MATCH}, "value"),
                  State("heads-target", "value"), State("heads-features", "value"),
                  prevent_initial_call=True)
    def move_threshold(value: object, target: object, features: object) -> str:
        evaluation = _loaded(current(), target, features)
        label = checks.mapping(ctx.triggered_id).get("label")
        threshold = checks.number(value, 0.0, 1.0, None)
        if (evaluation is None or not evaluation.multi_label or threshold is None
                or checks.one_of(label, evaluation.classes, None) is None):
            return no_update
        return readout(evaluation, label, threshold)

