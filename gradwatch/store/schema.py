"""The one schema of a run store: a SQLite database `gradwatch.db` in WAL mode, one per run directory.

Tables (documented for users in docs/store.md):
  meta(key, value)               JSON values: schema_version, status, model, optimizer, versions, ...
  series(kind, idx, name, ...)   what each position of a metric's vector means; kind is "layer" or
                                 "activation", idx the position, in model order (activations in call order)
  steps(step, time, loss, ...)   one row per recorded optimizer step
  metric_values(metric, step, data)
                                 one row per metric and step: `data` holds float32 values for series
                                 0..n-1 of that metric's kind (little-endian); NaN means not measured
  events(step, kind, phase, module, ...)
                                 non-finite onsets, with the module that produced them
  findings(kind, layer, step, severity, ...)
                                 the live detectors' latest findings, replaced as a whole at each pass
One row per (metric, step) instead of one per value keeps a 100k-step, 100-layer run near 400 MB
and lets a reader pull one metric's history with a single range scan of the primary key.
"""
from __future__ import annotations

SCHEMA_VERSION = 1
ROOT_NAME = "(root)"  # how the model itself is named in the store; "" is kept for run-wide findings
DB_NAME = "gradwatch.db"

LAYER_METRICS = ("grad_norm", "grad_maxabs", "weight_norm", "update_ratio", "nonfinite")
ACTIVATION_METRICS = ("dead_fraction", "zero_fraction", "saturation_fraction")
METRIC_KIND = {**{m: "layer" for m in LAYER_METRICS}, **{m: "activation" for m in ACTIVATION_METRICS}}

# steps.flags bits. SQLite stores a NaN REAL as NULL: a NULL loss with this bit set was NaN.
LOSS_NONFINITE = 1
GRAD_NONFINITE = 2
FORWARD_NONFINITE = 4
EVAL_FORWARD = 8  # a forward with gradients on ran while the model was in eval() mode
GRAD_CARRIED = 16  # .grad still held the previous step's values at this step's first backward (no zero_grad)

DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    module_type TEXT,
    size INTEGER,
    PRIMARY KEY (kind, idx)
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    loss REAL,
    grad_norm REAL,
    lrs TEXT,
    skipped INTEGER,
    loss_scale REAL,
    flags INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metric_values (
    metric TEXT NOT NULL,
    step INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (metric, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    module TEXT NOT NULL,
    rank INTEGER,
    value REAL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS findings (
    kind TEXT NOT NULL,
    layer TEXT NOT NULL,
    step INTEGER NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    suggestion TEXT NOT NULL,
    evidence TEXT,
    first_seen REAL,
    PRIMARY KEY (kind, layer, step)
);
"""

PRAGMAS_WRITER = (
    "PRAGMA journal_mode=WAL",
    # In WAL mode NORMAL loses nothing a process kill could take: each commit is in the OS's hands.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
)
