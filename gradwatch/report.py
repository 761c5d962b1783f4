"""Render a `Report` as Markdown, JSON or one self-contained HTML file. No torch, no network.

    from gradwatch.report import render
    render(gradwatch.diagnose("runs/exp1"), "html")

The JSON format is versioned (`REPORT_SCHEMA`) and documented in docs/report.md.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from html import escape

import numpy as np
import pandas as pd

from . import _svg
from .detect import SEVERITIES, Finding
from .diagnosis import REPORT_SCHEMA, Report

FORMATS = ("md", "html", "json")
MAX_BINS = 200  # heatmap columns: steps are averaged into at most this many bins
MAX_CELLS = 20_000  # heatmap cells: fewer bins for very deep models keeps the file small
LOSS_MARKS = {"loss_spike": "loss spike", "nan_inf": "NaN/Inf"}  # finding kinds marked on the loss chart


def render(report: Report, fmt: str) -> str:
    """The report as text in one of `FORMATS`.

    Args:
        report: what `gradwatch.diagnose()` returned.
        fmt: "md", "html" or "json".

    Raises:
        ValueError: for any other `fmt`.
    """
    renderers = {"md": to_markdown, "html": to_html, "json": to_json}
    if fmt not in renderers:
        raise ValueError(f"render: fmt must be one of {list(FORMATS)}, got fmt={fmt!r}")
    return renderers[fmt](report)


# ---- facts shared by every format --------------------------------------------------------------------------
def _where(layer: str, code: str) -> str:
    """ "in <layer>", the name set in `code` (a Markdown or HTML code template), or "run-wide"."""
    return f"in {code.format(layer)}" if layer else "run-wide"


def _when(t) -> str:
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return "unknown"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _model_line(meta: dict) -> str:
    model = meta.get("model") or {}
    params = model.get("parameters")
    count = f", {params:,} parameters" if isinstance(params, int) else ""
    return f"{model.get('class', 'unknown')}{count}"


def _optimizer_line(meta: dict) -> str:
    parts = []
    for opt in meta.get("optimizer") or []:
        lrs = [g.get("lr") for g in opt.get("param_groups", [])]
        lr = ", ".join(_svg.fmt(v) if isinstance(v, (int, float)) else str(v) for v in lrs)
        parts.append(f"{opt.get('class', 'unknown')}" + (f", lr {lr}" if lrs else ""))
    return "; ".join(parts) or "none recorded"


def _facts(report: Report) -> list[tuple[str, str]]:
    """The run table: (label, value) rows shown by the Markdown and HTML reports."""
    last = f" (last step {report.last_step})" if report.last_step is not None else ""
    return [("status", report.status), ("steps", f"{report.n_steps}{last}"), ("model", _model_line(report.meta)),
            ("optimizer", _optimizer_line(report.meta)), ("started", _when(report.meta.get("start_time")))]


def _by_severity(report: Report) -> list[tuple[str, list[Finding]]]:
    """Findings grouped by severity, worst first, keeping the report's order inside each group."""
    groups = [(s, [f for f in report.findings if f.severity == s]) for s in reversed(SEVERITIES)]
    return [(s, fs) for s, fs in groups if fs]


# ---- Markdown ------------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(text: str, indent: str) -> str:
    """Text continued on indented lines, so a multi-line message stays inside its list item."""
    return text.strip().replace("\n", "\n" + indent)


def to_markdown(report: Report) -> str:
    """The report for terminals and pull requests: verdict, run table, then findings worst first.

    Messages and suggestions are kept as written, so code in backticks renders as code.
    """
    out = [f"# gradwatch report: {report.name}", "", f"**Verdict:** {report.summary()}", "",
           "| run | |", "|---|---|"]
    out += [f"| {label} | {_md_cell(value)} |" for label, value in _facts(report)]
    out += ["", "## Findings", ""]
    if not report.findings:
        out += ["No problems found.", ""]
    for severity, findings in _by_severity(report):
        out += [f"### {severity.capitalize()} ({len(findings)})", ""]
        for f in findings:
            out.append(f"- **{f.kind}** {_where(f.layer, '`{}`')} at step {f.step}: {_md_block(f.message, '  ')}")
            out.append(f"  - Fix: {_md_block(f.suggestion, '    ')}")
        out.append("")
    return "\n".join(out)


# ---- JSON ----------------------------------------------------------------------------------------------------
def _json_safe(value):
    """Plain JSON values: NaN and Inf become None, numpy scalars and arrays plain numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # anything else a detector put in its evidence: keep it readable rather than fail


def _finding_dict(f: Finding) -> dict:
    d = _json_safe(f.to_dict())
    d["evidence"] = dict(sorted(d["evidence"].items()))
    return d


def _run_dict(report: Report) -> dict:
    meta = report.meta
    model = meta.get("model") or {}
    return {
        "name": report.name, "run_dir": report.run_dir, "status": report.status, "n_steps": report.n_steps,
        "last_step": report.last_step, "start_time": meta.get("start_time"), "end_time": meta.get("end_time"),
        "model": {"class": model.get("class"), "parameters": model.get("parameters"),
                  "trainable_parameters": model.get("trainable_parameters"),
                  "n_layers": len(model.get("layers") or []), "n_activations": len(model.get("activations") or [])},
        "optimizer": meta.get("optimizer") or [],
        "torch_version": meta.get("torch_version"), "gradwatch_version": meta.get("gradwatch_version"),
    }


def to_json(report: Report) -> str:
    """The report as JSON in the `gradwatch.report/1` format (docs/report.md).

    Keys come in a fixed order (evidence keys sorted), NaN and Inf are written as null, and the output
    ends with a newline.
    """
    doc = {
        "schema": REPORT_SCHEMA,
        "run": _json_safe(_run_dict(report)),
        "summary": {"healthy": report.healthy, "worst": report.worst, "counts": report.counts(),
                    "line": report.summary()},
        "findings": [_finding_dict(f) for f in report.findings],
    }
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# ---- HTML ----------------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:920px;
margin:2em auto;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
code,pre{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f4f4f4;
border-radius:3px;padding:0 3px;overflow-wrap:anywhere}
pre{padding:.6em;white-space:pre-wrap}
.verdict{padding:.7em 1em;border-radius:6px;font-weight:600;border-left:6px solid}
.finding{border-left:6px solid;border-radius:6px;padding:.5em 1em;margin:.8em 0}
.critical{background:#fdecec;border-color:#c62828}.warning{background:#fff6e0;border-color:#e69500}
.info{background:#eaf2fd;border-color:#2f6fca}.healthy{background:#e9f7ec;border-color:#2e7d32}
.badge{font-size:.8em;font-weight:700;text-transform:uppercase;letter-spacing:.04em}
.finding p{margin:.35em 0}.fix{font-weight:500}
table{border-collapse:collapse;margin:.5em 0}td,th{text-align:left;padding:2px 12px 2px 0;vertical-align:top}
th{color:#57606a;font-weight:500}
svg{max-width:100%;height:auto;display:block;margin:1em 0}
svg text{font:11px system-ui,sans-serif;fill:#444}svg text.title{font-size:13px;font-weight:600;fill:#1f2328}
svg text.note{font-size:13px;fill:#888}
"""
_CODE = re.compile(r"`([^`\n]+)`")


def _html_text(text: str) -> str:
    """Escaped text in which `backtick spans` become <code>."""
    return _CODE.sub(r"<code>\1</code>", escape(text))


def _html_finding(f: Finding) -> str:
    evidence = ""
    if f.evidence:
        body = json.dumps(_json_safe(f.evidence), indent=1, sort_keys=True, allow_nan=False)
        evidence = f"<details><summary>evidence</summary><pre>{escape(body)}</pre></details>"
    return (f'<div class="finding {f.severity}"><p><span class="badge">{f.severity}</span> '
            f"<strong>{escape(f.kind)}</strong> {_where(escape(f.layer), '<code>{}</code>')} at step {f.step}</p>"
            f"<p>{_html_text(f.message)}</p><p class=\"fix\">Fix: {_html_text(f.suggestion)}</p>{evidence}</div>")


def _html_findings(report: Report) -> str:
    if not report.findings:
        return "<h2>Findings</h2><p>No problems found.</p>"
    return "<h2>Findings</h2>" + "".join(_html_finding(f) for f in report.findings)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _html_layers(layers: list[dict]) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(str(ly.get('name')))}</code></td><td>{escape(str(ly.get('type')))}</td>"
        f"<td>{ly.get('parameters', 0):,}</td><td>{'' if ly.get('trainable', True) else 'frozen'}</td></tr>"
        for ly in layers)
    return (f"<details><summary>{len(layers)} layers</summary><table><tr><th>layer</th><th>type</th>"
            f"<th>parameters</th><th></th></tr>{rows}</table></details>")


def _html_meta(report: Report) -> str:
    meta = report.meta
    rows = _facts(report) + [("ended", _when(meta.get("end_time"))), ("run folder", report.run_dir)]
    rows += [(k.replace("_", " "), str(meta[k])) for k in ("device", "torch_version", "gradwatch_version",
                                                             "python_version") if meta.get(k) is not None]
    parts = ["<h2>Run</h2>", _table(rows)]
    layers = (meta.get("model") or {}).get("layers")
    if layers:
        parts.append(_html_layers(layers))
    if meta.get("config"):
        config = json.dumps(_json_safe(meta["config"]), indent=1, allow_nan=False)
        parts.append(f"<details><summary>watch config</summary><pre>{escape(config)}</pre></details>")
    return "".join(parts)


def _loss_chart(report: Report) -> str:
    steps = report.frames.steps
    loss = steps["loss"].to_numpy(dtype=float)
    finite = loss[np.isfinite(loss)]
    log_y = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 100)
    marks = [(f.step, LOSS_MARKS[f.kind], f"{f.kind} at step {f.step}: {f.message}")
             for f in report.findings if f.kind in LOSS_MARKS]
    marks += [(int(s), "non-finite step", f"non-finite values at step {int(s)}")
              for s in steps.loc[steps["nonfinite"].astype(bool), "step"]]
    return _svg.line_chart([("loss", steps["step"].to_numpy(dtype=float), loss)], title="Loss",
                           y_label="loss (log)" if log_y else "loss", log_y=log_y, marks=marks)


def _bin_mean(wide: pd.DataFrame, max_bins: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A steps x series frame averaged over at most `max_bins` equal-width step bins.

    Returns:
        A series x bins array (NaN where a bin holds no measurement; Inf stays Inf) and the step range
        the bins cover.
    """
    steps = wide.index.to_numpy(dtype=float)
    lo, hi = steps.min(), steps.max() + 1
    n = min(max_bins, len(steps))
    idx = np.minimum(((steps - lo) / (hi - lo) * n).astype(int), n - 1)
    means = wide.astype(float).groupby(idx).mean().reindex(range(n))
    return means.to_numpy().T, (float(lo), float(hi))


def _grad_heatmap(report: Report) -> str:
    title = "Gradient norm per layer (log colour scale, mean per step bin)"
    wide = report.frames.metric("grad_norm")
    if wide.empty:
        return _svg.empty(title)
    values, span = _bin_mean(wide, min(MAX_BINS, max(MAX_CELLS // wide.shape[1], 20)))
    return _svg.heatmap(values, [str(c) for c in wide.columns], span, title=title)


def _dead_chart(report: Report) -> str:
    wide = report.frames.metric("dead_fraction")
    if wide.empty:
        return ""
    x = wide.index.to_numpy(dtype=float)
    series = [(str(c), x, wide[c].to_numpy(dtype=float)) for c in wide.columns]
    steps = report.frames.steps["step"]
    span = (float(steps.min()), float(steps.max())) if len(steps) else None  # line up with the loss chart
    return _svg.line_chart(series, title="Dead fraction per activation", y_label="share of dead units",
                           x_range=span, y_range=(0.0, 1.0))


def _html_charts(report: Report) -> str:
    if report.frames is None:
        return "<h2>Charts</h2><p>No recorded data to chart.</p>"
    return "<h2>Charts</h2>" + _loss_chart(report) + _grad_heatmap(report) + _dead_chart(report)


def to_html(report: Report) -> str:
    """One self-contained HTML page: verdict, findings with fixes, charts as inline SVG, run metadata.

    It loads nothing from the network (inline CSS, no scripts, no fonts or images), so it opens offline
    and can be attached to a CI job as is. A 100k-step run still gives a file of a few hundred kB.
    """
    worst = report.worst if not report.healthy else "healthy"
    title = escape(f"gradwatch report: {report.name}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
            f'<p class="verdict {worst}">{escape(report.summary())}</p>\n'
            f"{_html_findings(report)}\n{_html_charts(report)}\n{_html_meta(report)}\n</body>\n</html>\n")
