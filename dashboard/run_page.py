"""Run page: one run's verdict, findings (each with a jump to its step) and charts, refreshed live while it trains."""
from __future__ import annotations

import streamlit as st

from gradwatch._dashboard import _sections, _state
from gradwatch.query import list_run_dirs


def main() -> None:
    with _state.guard("the run page"):
        name = _pick_run()
        if name is None:
            return
        path = _state.run_path(name)  # a name from the URL or a widget never becomes a path unchecked
        with _state.open_view(path) as view:
            live = view.status == "running"
        # a running run redraws itself every LIVE_EVERY s; the fragment reads only the rows written since
        st.fragment(_live_body, run_every=_state.LIVE_EVERY if live else None)(path, name, live)


def _pick_run() -> str | None:
    """The run named by ?run=NAME, under a title row whose picker switches runs (and rewrites the URL)."""
    root = _state.runs_dir()
    wanted = st.query_params.get("run")
    names = [d.relative_to(root).as_posix() for d in list_run_dirs(root)] if root.is_dir() else []
    title, picker = st.columns([4, 1.3], vertical_alignment="bottom")
    if names:
        index = names.index(wanted) if wanted in names else None
        choice = picker.selectbox("Run", names, index=index, placeholder="Pick a run", label_visibility="collapsed")
        if choice is not None and choice != wanted:
            st.query_params["run"] = choice
            wanted = choice
    title.header(_state.md_escape(wanted) if wanted else "Run", anchor=False)
    if wanted:
        return wanted
    if _state.check_runs_dir(root):
        if names:
            st.info("Pick a run above, or open one from the Runs page.", icon=":material/info:")
        else:
            st.info(_state.NO_RUNS_HELP.format(root=root), icon=":material/info:")
    return None


def _live_body(path, name: str, live: bool) -> None:
    with _state.guard(f"run {name!r}"):
        with _state.open_view(path) as view:
            if live and view.status != "running":
                st.rerun()  # the run ended: draw it once more, without the timer
            findings = view.findings()
            steps = view.steps()
            _header(view, findings, steps)
            if steps.empty:
                st.info("No steps recorded yet. This page shows them as soon as the run flushes its first "
                        "steps (`gw.step(loss)` after each optimizer step; flushed at least once a second).",
                        icon=":material/hourglass_empty:")
                _sections.metadata(view)
                return
            bounds = int(steps["step"].iloc[0]), int(steps["step"].iloc[-1])
            _findings(findings, view, name, bounds)
            zoom = _zoom(name, bounds)
            span = _sections.Span(*(zoom or bounds), zoomed=zoom is not None,
                                  focus=st.session_state.get(_key("focus", name)))
            _sections.charts(view, name, span, findings, lr_columns=list(steps.columns))
            _sections.metadata(view)
            _sections.downloads(view, name)


# ---- header: the verdict at a glance ------------------------------------------------------------------------
def _header(view, findings, steps) -> None:
    """Badges, the verdict (the worst finding, or healthy), what the run is, and its latest numbers."""
    counts = findings["severity"].value_counts().to_dict() if len(findings) else {}
    worst = "critical" if counts.get("critical") else "warning" if counts.get("warning") else "healthy"
    verdict = ", ".join(f"{counts[s]} {s}" for s in ("critical", "warning") if counts.get(s)) or "healthy"
    live = view.status == "running"
    st.markdown(" ".join([_state.status_badge(view.status), _state.health_badge(worst, verdict),
                          f":gray[updated {_state.fmt_ago(view.updated)}]" if view.updated else "",
                          f":blue[refreshing every {_state.LIVE_EVERY:.0f} s]" if live else ""]))
    if worst != "healthy":
        top = findings.iloc[0]
        where = f" in `{top['layer']}`" if top["layer"] else ""
        tone = st.error if worst == "critical" else st.warning
        tone(f"**{_kind_title(top['kind'])}**{where} at step {int(top['step'])}: {_first_sentence(top['message'])}",
             icon=_state.SEVERITY_ICON[worst])
    elif view.n_steps:
        detectors = (view.meta.get("config") or {}).get("detect_every", 0)
        st.success("Healthy so far: the live detectors found nothing at warning or above." if detectors else
                   "No findings stored: the live detectors were off (`detect_every=0`); "
                   "`gradwatch report RUN_DIR` diagnoses the run.", icon=":material/favorite:")
    model = view.meta.get("model") or {}
    params = model.get("parameters")
    opt = "; ".join(o.get("class", "?") for o in view.meta.get("optimizer") or []) or "no optimizer"
    st.caption(" · ".join([
        f"{model.get('class', 'model')}" + (f" ({params:,} parameters)" if isinstance(params, int) else ""),
        opt, f"started {_state.fmt_time(view.started)}"]))
    last = steps.iloc[-1] if len(steps) else None
    m = st.columns(5)
    m[0].metric("Steps", f"{len(steps):,}")
    m[1].metric("Last step", "–" if last is None else f"{int(last['step']):,}")
    m[2].metric("Loss", _last_value(last, "loss"))
    m[3].metric("Grad norm", _last_value(last, "grad_norm"))
    m[4].metric("Findings", f"{len(findings)}")


def _last_value(last, column: str) -> str:
    """The last step's loss or norm; a NaN the store flagged as non-finite reads "NaN", not "not recorded"."""
    if last is None:
        return "–"
    v = float(last[column])
    return "NaN" if v != v and bool(last["nonfinite"]) else _state.fmt_num(v)


KIND_TITLES = {"nan_inf": "NaN/Inf", "dead_relu": "Dead ReLU", "adam_weight_decay": "Adam weight decay",
               "amp_overflow": "AMP overflow"}


def _kind_title(kind: str) -> str:
    return KIND_TITLES.get(kind) or str(kind).replace("_", " ").capitalize()


def _first_sentence(text: str) -> str:
    text = str(text)
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


# ---- zoom: a step range every chart shows; a finding's button sets it ----------------------------------------
def _key(what: str, name: str) -> str:
    return f"{what}:{name}"


def _zoom(name: str, bounds: tuple[int, int]) -> tuple[int, int] | None:
    """The step range the charts show (None: the whole run), from a slider that findings can set."""
    first, last = bounds
    if last <= first:
        return None
    zkey, skey = _key("zoom", name), _key("zoom_slider", name)
    want = st.session_state.get(zkey) or (first, last)
    want = (max(first, min(want[0], last)), max(first, min(want[1], last)))
    if st.session_state.get(skey) != want:
        st.session_state[skey] = want
    left, right = st.columns([6, 1], vertical_alignment="bottom")
    left.slider("Step range shown", first, last, key=skey, on_change=_zoom_changed, args=(name, first, last))
    focus = st.session_state.get(_key("focus", name))
    right.button("Whole run", key=_key("reset", name), disabled=want == (first, last) and focus is None,
                 on_click=_reset, args=(name,), icon=":material/zoom_out_map:")
    return None if want == (first, last) else want


def _reset(name: str) -> None:
    st.session_state[_key("zoom", name)] = None
    st.session_state[_key("focus", name)] = None


def _zoom_changed(name: str, first: int, last: int) -> None:
    lo, hi = st.session_state[_key("zoom_slider", name)]
    st.session_state[_key("zoom", name)] = None if (lo, hi) == (first, last) else (lo, hi)


def _jump(name: str, step: int, first: int, last: int) -> None:
    """Centre the charts on `step`: a window of a tenth of the run (at least 20 steps) around it."""
    half = max(10, (last - first) // 20)
    lo, hi = max(first, step - half), min(last, step + half)
    st.session_state[_key("zoom", name)] = (lo, hi) if (lo, hi) != (first, last) else None
    st.session_state[_key("focus", name)] = step


# ---- findings, worst first ----------------------------------------------------------------------------------
SEVERITY_COLOR = {"critical": "red", "warning": "orange", "info": "blue"}


def _findings(findings, view, name: str, bounds: tuple[int, int]) -> None:
    st.subheader("Findings", anchor=False)
    if findings.empty:
        on = (view.meta.get("config") or {}).get("detect_every", 0)
        st.caption("None stored." + ("" if on else " The live detectors were off (`detect_every=0`); "
                                     "`gradwatch report RUN_DIR` diagnoses the run afterwards."))
        return
    first, last = bounds
    for i, f in enumerate(findings.itertuples(index=False)):
        sev = str(f.severity)
        where = f" in `{f.layer}`" if f.layer else ""
        label = f":{SEVERITY_COLOR.get(sev, 'gray')}[**{sev}**] · {f.kind}{where} · step {int(f.step)}"
        with st.expander(label, expanded=i == 0, icon=_state.SEVERITY_ICON.get(sev)):
            st.markdown(str(f.message))
            st.markdown(f"**Fix:** {f.suggestion}")
            st.button(f"Show step {int(f.step)} on the charts", key=_key(f"jump{i}", name),
                      icon=":material/my_location:", on_click=_jump, args=(name, int(f.step), first, last))


if __name__ == "__main__":
    main()
