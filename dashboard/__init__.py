"""The gradwatch dashboard: a Streamlit app over the run stores, shipped in the wheel as `gradwatch._dashboard`.

`app.py` is the entry point (`gradwatch dashboard RUNS_DIR` runs `streamlit run app.py -- RUNS_DIR`); it only
builds the navigation. `overview.py`, `run_page.py` and `compare.py` are the pages, each a script that
Streamlit executes, over the cached views in `_state.py`. Nothing here trains or writes a store.
"""
