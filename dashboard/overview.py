"""Runs overview: every run under RUNS_DIR, its status and health at a glance, and a link to its page."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from gradwatch._dashboard import _state
from gradwatch.query import overview

COLUMNS = [3.2, 1.3, 1.6, 1.0, 1.9, 1.9]


def main() -> None:
    root = _state.runs_dir()
    st.title("Runs", anchor=False)
    st.caption(f"`{root.resolve()}` · refreshes every {_state.OVERVIEW_EVERY:.0f} s")
    with _state.guard("the runs overview"):
        if _state.check_runs_dir(root):
            st.fragment(_runs, run_every=_state.OVERVIEW_EVERY)(root)


def _runs(root) -> None:
    with _state.guard("the runs overview"):
        if not _state.check_runs_dir(root):
            return
        df = overview(root)
        if df.empty:
            st.info(_state.NO_RUNS_HELP.format(root=root), icon=":material/info:")
            return
        summary, link = st.columns([4, 1], vertical_alignment="center")
        with summary:
            _summary(df)
        if len(df) > 1:
            link.page_link("compare.py", label="Compare runs", icon=":material/compare_arrows:")
        _header()
        order = df.assign(_u=pd.to_datetime(df["updated"], errors="coerce")).sort_values(
            "_u", ascending=False, na_position="last", kind="stable")
        for row in order.itertuples(index=False):
            _row(row)


def _summary(df: pd.DataFrame) -> None:
    health = df["health"].map(_state.health_of)
    parts = [f"**{len(df)}** run{'s' * (len(df) != 1)}"]
    running = int((df["status"] == "running").sum())
    if running:
        parts.append(_state.badge(f"{running} running", "blue", ":material/autorenew:"))
    for h, label in (("critical", "critical"), ("warning", "warning"), ("healthy", "healthy")):
        n = int((health == h).sum())
        if n:
            parts.append(_state.health_badge(h, f"{n} {label}"))
    st.markdown(" &nbsp; ".join(parts))


def _header() -> None:
    cols = st.columns(COLUMNS)
    for col, label in zip(cols, ["run", "status", "health", "steps", "started", "updated"]):
        col.caption(f"**{label}**")


def _row(row) -> None:
    with st.container(border=True):
        c = st.columns(COLUMNS, vertical_alignment="center")
        c[0].page_link("run_page.py", label=_state.md_escape(row.run), icon=":material/monitor_heart:",
                       query_params={"run": str(row.run)})
        if isinstance(row.error, str) and row.error:
            c[0].caption(f":red[{row.error.splitlines()[0]}]")
        elif isinstance(row.model, str) and row.model:
            c[0].caption(row.model)
        c[1].markdown(_state.status_badge(row.status))
        findings = _int(row.findings)
        health = _state.health_of(row.health)
        label = health if not findings else f"{health} · {findings} finding{'s' * (findings != 1)}"
        c[2].markdown(_state.health_badge(row.health, label))
        c[3].markdown(f"**{_state.fmt_num(_int(row.steps))}**")
        c[4].markdown(_state.fmt_time(row.started))
        ago = _state.fmt_ago(row.updated)
        c[5].markdown(_state.fmt_time(row.updated) + (f"  \n:gray[{ago}]" if ago else ""))


def _int(v) -> int:
    try:
        return 0 if v is None or pd.isna(v) else int(v)
    except (TypeError, ValueError):
        return 0


if __name__ == "__main__":
    main()
