"""The run page's sections: charts (each skips itself when the run did not record its data), metadata, downloads."""
from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape

import altair as alt
import pandas as pd
import streamlit as st

from gradwatch import viz
from gradwatch._dashboard import _state

LAYER_METRICS = {"grad_norm": "gradient norm", "grad_maxabs": "gradient max |g|", "weight_norm": "weight norm",
                 "update_ratio": "update / weight ratio"}
MAX_DEFAULT_LAYERS = 4
FOCUS_COLOR = "#d62728"
CHROME_PX = 80  # title, x axis and its title, which Vega-Lite leaves out of `height` and Streamlit does not


# ---- helpers over the query layer's frames ------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """The steps every chart shows: the whole run, or the zoom a slider or a finding's button set."""

    lo: int
    hi: int
    zoomed: bool = False
    focus: int | None = None  # a finding's step, drawn as a red rule

    def cut(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows (bins) of `df` that overlap the span."""
        if not self.zoomed or df.empty:
            return df
        if "step_lo" in df:
            return df[(df["step_hi"] >= self.lo) & (df["step_lo"] <= self.hi)]
        return df[(df["step"] >= self.lo) & (df["step"] <= self.hi)]

    @property
    def where(self) -> str:
        return f" in steps {self.lo}-{self.hi}" if self.zoomed else ""


def _show(chart, span: Span) -> None:
    """Draw a chart with its x axis over the span (so every chart lines up) and the focused step as a rule."""
    if isinstance(chart, (alt.Chart, alt.LayerChart)):
        extra = [alt.Chart(pd.DataFrame({"step": [span.lo, span.hi]})).mark_point(opacity=0).encode(x="step:Q")]
        if span.focus is not None and span.lo <= span.focus <= span.hi:
            extra.append(alt.Chart(pd.DataFrame({"step": [span.focus], "label": [f"step {span.focus}"]})).mark_rule(
                color=FOCUS_COLOR, strokeDash=[4, 3], strokeWidth=1.5).encode(x="step:Q", tooltip=["label:N"]))
        chart = alt.layer(chart, *extra)
        if isinstance(chart.height, int):
            chart = chart.properties(height=chart.height + CHROME_PX)
    st.altair_chart(chart)


def _none(text: str) -> None:
    st.caption(f":gray[{text}]")


def clip_threshold(meta: dict) -> float | None:
    """The gradient clipping threshold, when the run recorded one (integrations may; a plain loop does not)."""
    for source in (meta, meta.get("config") or {}, meta.get("trainer") or {}):
        for key in ("clip_grad_norm", "max_grad_norm", "gradient_clip_val", "clip"):
            v = source.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
    return None


def lr_groups(columns: list[str]) -> list[str]:
    """The steps frame's learning-rate columns, one per param group: lr, lr_1, lr_2, ..."""
    cols = [c for c in columns if re.fullmatch(r"lr(_\d+)?", c)]
    return sorted(cols, key=lambda c: int(c[3:]) if c != "lr" else 0)


# ---- charts -------------------------------------------------------------------------------------------------
def charts(view, name: str, span: Span, findings: pd.DataFrame, lr_columns: list[str]) -> None:
    """Every chart of the run page; each says so in a grey line instead when the run did not record its data."""
    if span.focus is not None:
        st.caption(f":red[┆] marks step {span.focus}, the finding you picked.")
    st.subheader("Training", anchor=False)
    left, right = st.columns(2)
    with left:
        loss = span.cut(view.series_binned("loss"))
        if loss.empty:
            _none(f"No loss recorded{span.where} (pass it to `gw.step(loss)`).")
        else:
            _show(viz.loss_chart(loss, span.cut(view.markers())), span)
    with right:
        gn = span.cut(view.series_binned("grad_norm"))
        if gn.empty:
            _none(f"No global gradient norm recorded{span.where}.")
        else:
            _show(viz.grad_norm_chart(gn, clip_threshold(view.meta)), span)
    left, right = st.columns(2)
    with left:
        groups = {f"group {i}": span.cut(view.series_binned(c)) for i, c in enumerate(lr_groups(lr_columns))}
        groups = {k: v for k, v in groups.items() if not v.empty}
        if groups:
            _show(viz.lr_chart(groups), span)
        else:
            _none(f"No learning rate recorded{span.where} (none without an optimizer passed to `watch()`).")
    with right:
        ratio = span.cut(view.metric_binned("update_ratio"))
        if ratio.empty:
            _none(f"No update/weight ratio recorded{span.where} (measured on detail steps only).")
        else:
            _show(viz.update_ratio_chart(ratio), span)
    _layers(view, name, span, findings)
    _activations(view, span)


def _default_layers(names: list[str], findings: pd.DataFrame) -> list[str]:
    """The layers the findings name, then the first and the last layer: MAX_DEFAULT_LAYERS at most."""
    flagged = [x for x in findings["layer"].tolist() if x in names] if len(findings) else []
    return list(dict.fromkeys(flagged + names[:1] + names[-1:]))[:MAX_DEFAULT_LAYERS]


def _layers(view, name: str, span: Span, findings: pd.DataFrame) -> None:
    st.subheader("Layers", anchor=False)
    names = view.layers("grad_norm")
    if not names:
        _none("No layers were watched.")
        return
    heat = span.cut(view.heatmap("grad_norm"))
    if heat.empty:
        _none(f"No per-layer gradient norms recorded{span.where}.")
    else:
        st.caption("Mean gradient norm of each layer per bin of steps, on a log colour scale; layers in model order.")
        _show(viz.heatmap_chart(heat), span)
    key = f"layers:{name}"
    if key not in st.session_state:
        st.session_state[key] = _default_layers(names, findings)
    st.session_state[key] = [x for x in st.session_state[key] if x in names]
    pick, metric_col = st.columns([3, 1])
    picked = pick.multiselect("Layers to plot", names, key=key, placeholder="Pick layers")
    metric = metric_col.selectbox("Metric", list(LAYER_METRICS), format_func=LAYER_METRICS.get,
                                  key=f"layer_metric:{name}")
    if not picked:
        _none("Pick one or more layers to plot their curves.")
        return
    long = span.cut(view.metric_binned(metric, layers=picked))
    if long.empty:
        _none(f"No {LAYER_METRICS[metric]} recorded for these layers{span.where}.")
    else:
        _show(viz.layer_lines_chart(long, metric), span)


def _activations(view, span: Span) -> None:
    st.subheader("Activations", anchor=False)
    if not view.layers("dead_fraction"):
        _none("No activation modules were watched (ReLU, GELU, tanh, sigmoid, ... with `activations=True`).")
        return
    left, right = st.columns(2)
    for col, metric in ((left, "dead_fraction"), (right, "saturation_fraction")):
        with col:
            long = span.cut(view.metric_binned(metric))
            if not long.empty:
                _show(viz.fraction_chart(long, metric), span)
            elif metric == "saturation_fraction":
                _none(f"No saturation recorded{span.where} (only tanh and sigmoid saturate).")
            else:
                _none(f"No dead units recorded{span.where} (measured once per dead-unit window, on ReLU-like "
                      "activations).")


# ---- metadata and downloads ---------------------------------------------------------------------------------
def metadata(view) -> None:
    meta = view.meta
    with st.expander("Run metadata: model, optimizer, config", icon=":material/info:"):
        model = meta.get("model") or {}
        params = model.get("parameters")
        trainable = model.get("trainable_parameters")
        st.markdown(f"**Model** `{model.get('class', 'unknown')}`"
                    + (f", {params:,} parameters" if isinstance(params, int) else "")
                    + (f" ({trainable:,} trainable)" if isinstance(trainable, int) and trainable != params else ""))
        layers = model.get("layers") or []
        if layers:
            st.dataframe(pd.DataFrame([{k: v for k, v in x.items() if k != "shapes"} for x in layers]),
                         hide_index=True)
        for i, opt in enumerate(meta.get("optimizer") or []):
            st.markdown(f"**Optimizer {i}** `{opt.get('class', 'unknown')}`")
            groups = opt.get("param_groups") or []
            if groups:
                st.dataframe(pd.DataFrame(groups).astype(str), hide_index=True)
        if not meta.get("optimizer"):
            st.markdown("**Optimizer**: none passed to `watch()`.")
        versions = {k: meta.get(k) for k in ("gradwatch_version", "torch_version", "python_version", "device",
                                             "host", "pid")}
        st.markdown("**Versions** " + " · ".join(f"{k.removesuffix('_version')} `{v}`" for k, v in versions.items()
                                                  if v is not None))
        st.json({"config": meta.get("config"), "include": meta.get("include"), "exclude": meta.get("exclude"),
                 "scaler": meta.get("scaler"), "loss": meta.get("loss")}, expanded=False)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def downloads(view, name: str) -> None:
    path, slug = view.path, _slug(name)
    st.subheader("Downloads", anchor=False)
    c = st.columns(3)
    c[0].download_button("Steps (CSV)", data=_deferred(lambda: view.steps().to_csv(index=False)),
                         file_name=f"{slug}-steps.csv", mime="text/csv", icon=":material/download:",
                         on_click="ignore", key=f"dl_steps:{name}")
    c[1].download_button("Layers, long form (CSV)", data=_deferred(lambda: _layers_csv(path)),
                         file_name=f"{slug}-layers.csv", mime="text/csv", icon=":material/download:",
                         on_click="ignore", key=f"dl_layers:{name}")
    c[2].download_button("Health report (HTML)", data=_deferred(lambda: _report_html(path), html=True),
                         file_name=f"{slug}-report.html", mime="text/html", icon=":material/download:",
                         on_click="ignore", key=f"dl_report:{name}")


def _layers_csv(path) -> str:
    from gradwatch import load_run

    return load_run(path).layers.to_csv(index=False)


def _report_html(path) -> str:
    import gradwatch
    from gradwatch.report import to_html

    return to_html(gradwatch.diagnose(path))


def _deferred(make, html: bool = False):
    """Build the file only when its button is clicked (off the script thread); a failure becomes the file's text."""
    def data() -> str:
        try:
            return make()
        except Exception as e:  # the callable runs on its own thread, where no st.error can show
            msg = f"gradwatch could not build this file: {_state.one_line(e)}"
            return f"<!doctype html><p>{escape(msg)}</p>" if html else msg + "\n"
    return data
