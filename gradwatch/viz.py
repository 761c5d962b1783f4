"""Chart builders: pure functions from the query layer's frames to Altair charts. No I/O, no streamlit.

Every builder takes the long frames of `gradwatch.query` (binned: step, step_lo, step_hi, min, mean, max, ...)
and returns an `alt.Chart` or `alt.LayerChart` with tooltips and titled axes; an empty frame gives a small
chart titled "...: no data yet" instead of an error, so a page can draw a run that has not flushed yet.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

HEIGHT = 260
BLUE = "#1f77b4"
INF_COLOR = "#d62728"
MARKER_COLORS = {"nan_inf": "#d62728", "loss_spike": "#ff7f0e", "nonfinite": "#9467bd"}
HEALTHY_BAND = (1e-4, 1e-2)  # update/weight ratio per step; ~1e-3 is the usual healthy value (Karpathy, cs231n)
HEALTHY_RATIO = 1e-3
MAX_LEGEND = 12  # more layers than this are coloured by depth (model order), without a legend entry each
METRIC_TITLES = {"grad_norm": "gradient norm", "grad_maxabs": "gradient max |g|", "weight_norm": "weight norm",
                 "update_ratio": "update / weight ratio", "nonfinite": "non-finite gradient values",
                 "dead_fraction": "dead-unit fraction", "zero_fraction": "zero fraction",
                 "saturation_fraction": "saturation fraction"}
# 950, 20k, 1.5M: SI suffixes per label (format "~s" puts one prefix on every tick: "0.1k")
_STEP_LABELS = ("abs(datum.value) >= 1e6 ? format(datum.value / 1e6, '~') + 'M' : "
                "abs(datum.value) >= 1e3 ? format(datum.value / 1e3, '~') + 'k' : format(datum.value, '~')")
_BIN_TIPS = [alt.Tooltip("step_lo:Q", title="from step"), alt.Tooltip("step_hi:Q", title="to step"),
             alt.Tooltip("min:Q", format=".4~g"), alt.Tooltip("mean:Q", format=".4~g"),
             alt.Tooltip("max:Q", format=".4~g")]


# ---- shared pieces -----------------------------------------------------------------------------------------
def _empty(title: str) -> alt.Chart:
    return (alt.Chart(pd.DataFrame({"text": ["no data yet"]})).mark_text(color="gray", fontSize=13)
            .encode(text="text:N").properties(title=f"{title}: no data yet", height=80))


def _is_empty(df: pd.DataFrame | None) -> bool:
    return df is None or len(df) == 0


def _wants_log(*columns) -> bool:
    """Log scale when every finite value is positive and they span more than two decades."""
    v = np.concatenate([pd.to_numeric(pd.Series(c), errors="coerce").to_numpy(np.float64) for c in columns])
    v = v[np.isfinite(v)]
    return bool(len(v)) and v.min() > 0 and v.max() / v.min() > 100


def _y_scale(log: bool) -> alt.Scale:
    return alt.Scale(type="log") if log else alt.Scale(zero=False)


def _x(field: str = "step") -> alt.X:
    return alt.X(f"{field}:Q", title="step", axis=alt.Axis(labelExpr=_STEP_LABELS))


def _band_and_line(binned: pd.DataFrame, title: str, color: str = BLUE) -> tuple[alt.Chart, alt.Chart, bool]:
    """A min..max band and a mean line over bins, on a log y when the values call for it."""
    df = binned[["step", "step_lo", "step_hi", "min", "mean", "max"]
                + [c for c in ("n", "nonfinite") if c in binned]]
    log = _wants_log(df["min"], df["max"])
    tips = _BIN_TIPS + [alt.Tooltip(f"{c}:Q") for c in ("n", "nonfinite") if c in df]
    base = alt.Chart(df).encode(x=_x())
    band = base.mark_area(opacity=0.22, color=color).encode(
        y=alt.Y("min:Q", scale=_y_scale(log), title=title), y2="max:Q", tooltip=tips)
    line = base.mark_line(color=color, strokeWidth=1.5).encode(y="mean:Q", tooltip=tips)
    return band, line, log


def _ordered(long: pd.DataFrame) -> list[str]:
    """The layers of a long frame in model order."""
    return long.sort_values("order", kind="stable")["layer"].drop_duplicates().astype(str).tolist()


def _by_layer(long: pd.DataFrame, y: alt.Y, title: str, positive_only: bool = False, what: str = "layer") -> alt.Chart:
    """One mean line per layer; a legend up to MAX_LEGEND layers, a depth colour scale beyond."""
    df = long[["layer", "order", "step", "step_lo", "step_hi", "min", "mean", "max"]].copy()
    df["layer"] = df["layer"].astype(str)
    if positive_only:
        df = df[df["mean"] > 0]
    names = _ordered(df) if len(df) else []
    if len(names) <= MAX_LEGEND:
        color = alt.Color("layer:N", sort=names, title=what, legend=alt.Legend(labelLimit=200))
    else:
        color = alt.Color("order:Q", scale=alt.Scale(scheme="viridis"), title=f"{what} (model order)")
    tips = [alt.Tooltip("layer:N", title=what), *_BIN_TIPS]
    return (alt.Chart(df).mark_line(strokeWidth=1.4)
            .encode(x=_x(), y=y, color=color, detail="layer:N", tooltip=tips)
            .properties(title=title, height=HEIGHT))


# ---- the builders -------------------------------------------------------------------------------------------
def loss_chart(binned: pd.DataFrame, markers: pd.DataFrame | None = None) -> alt.Chart | alt.LayerChart:
    """Loss over steps: the min..max band of each bin and its mean, with markers (NaN/Inf onsets, loss spikes,
    non-finite streaks) as rules coloured by kind. Log y when the loss is positive and spans > 2 decades."""
    if _is_empty(binned):
        return _empty("Loss")
    band, line, _ = _band_and_line(binned, "loss")
    layers = [band, line]
    if not _is_empty(markers):
        kinds = alt.Scale(domain=list(MARKER_COLORS), range=list(MARKER_COLORS.values()))
        layers.append(alt.Chart(markers[["step", "kind", "label"]]).mark_rule(strokeWidth=1.5, opacity=0.75)
                      .encode(x="step:Q", color=alt.Color("kind:N", scale=kinds, title="marker"),
                              tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("kind:N"), alt.Tooltip("label:N")]))
    return alt.layer(*layers).properties(title="Loss", height=HEIGHT)


def grad_norm_chart(binned: pd.DataFrame, clip: float | None = None) -> alt.Chart | alt.LayerChart:
    """Global gradient norm (before clipping) per bin, with a dashed rule at the clipping threshold if known."""
    if _is_empty(binned):
        return _empty("Global gradient norm")
    band, line, _ = _band_and_line(binned, "gradient norm (pre-clip)")
    layers = [band, line]
    if clip is not None and np.isfinite(clip) and clip > 0:
        rule = pd.DataFrame({"y": [float(clip)], "label": [f"clip at {clip:g}"]})
        layers.append(alt.Chart(rule).mark_rule(color="#555", strokeDash=[6, 3])
                      .encode(y="y:Q", tooltip=[alt.Tooltip("label:N")]))
        layers.append(alt.Chart(rule).mark_text(align="left", dx=4, dy=-7, color="#555")
                      .encode(y="y:Q", x=alt.value(0), text="label:N"))
    return alt.layer(*layers).properties(title="Global gradient norm", height=HEIGHT)


def lr_chart(frames_by_group: dict[str, pd.DataFrame]) -> alt.Chart:
    """Learning rate of each param group (the bin mean), one line per group, on a linear axis (warmup and
    decay read best that way)."""
    frames = [f.assign(group=str(g)) for g, f in (frames_by_group or {}).items() if not _is_empty(f)]
    if not frames:
        return _empty("Learning rate")
    df = pd.concat(frames, ignore_index=True)[["group", "step", "step_lo", "step_hi", "min", "mean", "max"]]
    groups = list(dict.fromkeys(df["group"]))
    return (alt.Chart(df).mark_line(strokeWidth=1.5, interpolate="step-after")
            .encode(x=_x(), y=alt.Y("mean:Q", title="learning rate", axis=alt.Axis(format="~e")),
                    color=alt.Color("group:N", sort=groups, title="param group"),
                    tooltip=[alt.Tooltip("group:N"), *_BIN_TIPS])
            .properties(title="Learning rate", height=HEIGHT))


def heatmap_chart(heat: pd.DataFrame, metric: str = "grad_norm") -> alt.Chart | alt.LayerChart:
    """Layers (model order, top to bottom) x step bins, coloured on a log scale; cells with an Inf in red."""
    what = METRIC_TITLES.get(metric, metric)
    title = f"{what[0].upper()}{what[1:]} per layer"
    if _is_empty(heat):
        return _empty(title)
    df = heat[["layer", "order", "step_lo", "step_hi", "value", "inf"]].copy()
    df["layer"] = df["layer"].astype(str)
    df["step_end"] = df["step_hi"] + 1  # cells run from a bin's first step to the next bin's
    df["inf"] = df["inf"].astype(bool)
    names = _ordered(df)
    y = alt.Y("layer:N", sort=names, title=None, axis=alt.Axis(labelLimit=240))
    tips = [alt.Tooltip("layer:N"), alt.Tooltip("step_lo:Q", title="from step"),
            alt.Tooltip("step_hi:Q", title="to step"), alt.Tooltip("value:Q", title=f"mean {what}", format=".3~e"),
            alt.Tooltip("inf:N", title="has Inf")]
    base = alt.Chart(df).encode(x=_x("step_lo"),
                                x2="step_end:Q", y=y, tooltip=tips)
    cells = base.transform_filter("isValid(datum.value) && datum.value > 0").mark_rect().encode(
        color=alt.Color("value:Q", scale=alt.Scale(type="log", scheme="viridis"), title=what,
                        legend=alt.Legend(format=".1e")))
    layers = [cells]
    if df["inf"].any():
        layers.append(base.transform_filter("datum.inf").mark_rect(color=INF_COLOR))
    height = int(min(max(14 * len(names), 120), 1400))
    return alt.layer(*layers).properties(title=title + (" (red: Inf)" if len(layers) > 1 else ""), height=height)


def layer_lines_chart(long: pd.DataFrame, metric: str) -> alt.Chart:
    """One line per layer of `metric` (bin means); log y when positive and spanning > 2 decades."""
    what = METRIC_TITLES.get(metric, metric)
    title = f"{what[0].upper()}{what[1:]} per layer"
    if _is_empty(long):
        return _empty(title)
    positive = long["mean"][long["mean"] > 0]
    # Norms span decades (an exploding layer next to healthy ones): a log axis, on which an exact 0 (no
    # gradient in that bin) has no place, whenever the positive values span more than two decades.
    log = _wants_log(positive) and len(positive) > 0
    return _by_layer(long, alt.Y("mean:Q", title=what, scale=_y_scale(log)), title, positive_only=log)


def update_ratio_chart(long: pd.DataFrame) -> alt.Chart | alt.LayerChart:
    """Update / weight ratio per layer on a log y, over the healthy band 1e-4..1e-2 and a rule at 1e-3."""
    title = "Update / weight ratio per layer"
    if _is_empty(long):
        return _empty(title)
    decades = alt.Axis(values=[10.0 ** k for k in range(-12, 3)], format=".0e")
    lines = _by_layer(long, alt.Y("mean:Q", title="||Δw|| / ||w||", scale=alt.Scale(type="log"), axis=decades),
                      title, positive_only=True)  # 0 (a frozen layer) has no place on a log axis
    band = (alt.Chart(pd.DataFrame({"lo": [HEALTHY_BAND[0]], "hi": [HEALTHY_BAND[1]]}))
            .mark_rect(color="#2ca02c", opacity=0.08).encode(y="lo:Q", y2="hi:Q"))
    ref = pd.DataFrame({"y": [HEALTHY_RATIO], "label": ["healthy ~1e-3"]})
    rule = (alt.Chart(ref).mark_rule(color="#2ca02c", strokeDash=[6, 3])
            .encode(y="y:Q", tooltip=[alt.Tooltip("label:N")]))
    text = (alt.Chart(ref).mark_text(align="left", dx=4, dy=-7, color="#1a7a1a", fontWeight="bold")
            .encode(y="y:Q", x=alt.value(0), text="label:N"))
    return alt.layer(band, lines, rule, text).properties(title=title, height=HEIGHT)


def fraction_chart(long: pd.DataFrame, metric: str) -> alt.Chart:
    """A 0..1 fraction (dead units, zeros, saturation) per activation site, one line each."""
    what = METRIC_TITLES.get(metric, metric)
    title = f"{what[0].upper()}{what[1:]} per activation"
    if _is_empty(long):
        return _empty(title)
    y = alt.Y("mean:Q", title=what, scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"))
    return _by_layer(long, y, title, what="activation")


def compare_chart(frames_by_run: dict[str, pd.DataFrame], y: str, title: str) -> alt.Chart:
    """Several runs' binned series overlaid: column `y` (e.g. "mean") against step, one colour per run."""
    frames = [f[["step", y]].assign(run=str(r)) for r, f in (frames_by_run or {}).items()
              if not _is_empty(f) and y in f]
    if not frames:
        return _empty(title)
    df = pd.concat(frames, ignore_index=True)
    runs = list(dict.fromkeys(df["run"]))
    return (alt.Chart(df).mark_line(strokeWidth=1.5)
            .encode(x=_x(), y=alt.Y(f"{y}:Q", title=title, scale=_y_scale(_wants_log(df[y]))),
                    color=alt.Color("run:N", sort=runs, title="run", legend=alt.Legend(labelLimit=240)),
                    tooltip=[alt.Tooltip("run:N"), alt.Tooltip("step:Q"), alt.Tooltip(f"{y}:Q", format=".4~g")])
            .properties(title=title, height=HEIGHT))
