"""Compare page: two or more runs overlaid: loss, global gradient norm, and one layer's metric."""
from __future__ import annotations

import contextlib

import streamlit as st

from gradwatch import viz
from gradwatch._dashboard import _state
from gradwatch.errors import GradwatchError
from gradwatch.query import list_run_dirs

METRICS = {"grad_norm": "gradient norm", "grad_maxabs": "gradient max |g|", "weight_norm": "weight norm",
           "update_ratio": "update / weight ratio", "dead_fraction": "dead-unit fraction",
           "saturation_fraction": "saturation fraction"}


def main() -> None:
    st.title("Compare runs", anchor=False)
    with _state.guard("the compare page"):
        root = _state.runs_dir()
        if not _state.check_runs_dir(root):
            return
        names = [d.relative_to(root).as_posix() for d in list_run_dirs(root)]
        if len(names) < 2:
            st.info("Comparing needs at least two runs under "
                    f"`{root}`; {'one is' if names else 'none are'} there so far.", icon=":material/info:")
            return
        if "cmp_runs" not in st.session_state:
            st.session_state["cmp_runs"] = _from_url(names)
        st.session_state["cmp_runs"] = [n for n in st.session_state["cmp_runs"] if n in names]
        picked = st.multiselect("Runs", names, key="cmp_runs", placeholder="Pick two or more runs")
        if picked != st.query_params.get_all("runs"):
            st.query_params["runs"] = picked  # a shareable URL: ?runs=a&runs=b
        if len(picked) < 2:
            st.info("Pick two or more runs to overlay them.", icon=":material/info:")
            return
        paths = {n: _state.run_path(n) for n in picked}
        live = False
        for p in paths.values():
            with contextlib.suppress(GradwatchError), _state.open_view(p, refresh=False) as v:
                live |= v.status == "running"
        st.fragment(_charts, run_every=_state.LIVE_EVERY if live else None)(paths)


def _from_url(names: list[str]) -> list[str]:
    """Runs named by ?runs=a&runs=b that exist (an unknown or unsafe name is dropped, with a warning)."""
    asked = st.query_params.get_all("runs")
    good = [n for n in dict.fromkeys(asked) if n in names]
    bad = [n for n in asked if n not in names]
    if bad:
        st.warning(f"Not runs under this folder, left out: {', '.join(repr(b) for b in bad[:5])}",
                   icon=":material/warning:")
    return good or names[:2]


def _charts(paths: dict) -> None:
    views, failed = {}, []
    for name, path in paths.items():
        try:
            with _state.open_view(path) as view:
                views[name] = view
        except GradwatchError as e:
            failed.append(f"**{name}**: {_state.one_line(e)}")
    for line in failed:
        st.error(line, icon=":material/error:")
    if not views:
        return
    with _state.guard("comparing runs"):
        st.markdown(" &nbsp; ".join(f"**{n}** {_state.status_badge(v.status)} {v.n_steps:,} steps"
                                    for n, v in views.items()))
        left, right = st.columns(2)
        with left:
            _overlay({n: v.series_binned("loss") for n, v in views.items()}, "Loss")
        with right:
            _overlay({n: v.series_binned("grad_norm") for n, v in views.items()}, "Global gradient norm")
        _layer_metric(views)


def _overlay(frames: dict, title: str, y: str = "mean") -> None:
    frames = {n: f for n, f in frames.items() if not f.empty}
    if not frames:
        st.caption(f":gray[{title}: none of these runs recorded it.]")
        return
    st.altair_chart(viz.compare_chart(frames, y, title))


def _layer_metric(views: dict) -> None:
    st.subheader("One layer, across runs", anchor=False)
    metric_col, layer_col = st.columns(2)
    metric = metric_col.selectbox("Metric", list(METRICS), format_func=METRICS.get, key="cmp_metric")
    layers = list(dict.fromkeys(x for v in views.values() for x in v.layers(metric)))
    if not layers:
        st.caption(":gray[None of these runs has a series for this metric.]")
        return
    layer = layer_col.selectbox("Layer", layers, key=f"cmp_layer:{metric}",
                                help="Layers named the same in each run (model order of the first run).")
    frames = {n: v.metric_binned(metric, layers=[layer]) for n, v in views.items() if layer in v.layers(metric)}
    missing = [n for n in views if n not in frames]
    if missing:
        st.caption(f":gray[Without a layer `{layer}`: {', '.join(missing)}.]")
    _overlay(frames, f"{METRICS[metric]} of {layer}")


if __name__ == "__main__":
    main()
