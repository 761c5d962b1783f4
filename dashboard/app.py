"""The dashboard's entry point, `streamlit run app.py -- RUNS_DIR` (what `gradwatch dashboard` runs).

It only sets the page up and builds the navigation; each page is its own script next to this one.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
PACKAGE = "gradwatch._dashboard"


def _import_package() -> None:
    """Make this folder importable as gradwatch._dashboard, the name the wheel installs it under.

    A checkout run by path (or an editable install made before the mapping existed) has no such package,
    so the folder is registered under that name; the pages then import their helpers from it.
    """
    try:
        if Path(importlib.import_module(PACKAGE).__file__).resolve().parent == HERE:
            return
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(PACKAGE, HERE / "__init__.py",
                                                  submodule_search_locations=[str(HERE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_import_package()
st.set_page_config(page_title="gradwatch", page_icon=":material/monitor_heart:", layout="wide")
pages = [
    st.Page(HERE / "overview.py", title="Runs", icon=":material/list:", url_path="runs", default=True),
    st.Page(HERE / "run_page.py", title="Run", icon=":material/monitor_heart:", url_path="run"),
    st.Page(HERE / "compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
]
st.navigation(pages, position="top").run()
