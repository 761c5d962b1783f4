"""Chart builders: each returns a chart whose spec validates (Altair validates in to_dict()) and carries the
encodings the dashboard relies on; an empty frame gives a "no data yet" chart, not an exception."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import pytest

from gradwatch import viz
from gradwatch.query import HEATMAP_COLUMNS, MARKER_COLUMNS, METRIC_COLUMNS, SERIES_COLUMNS, RunView


def series(values, start: int = 0, width: int = 10) -> pd.DataFrame:
    v = np.asarray(values, float)
    lo = start + width * np.arange(len(v))
    return pd.DataFrame({"step": lo + (width - 1) / 2, "step_lo": lo, "step_hi": lo + width - 1, "min": v * 0.9,
                         "mean": v, "max": v * 1.1, "n": width, "nonfinite": 0})[SERIES_COLUMNS]


def long(layers: dict[str, list[float]]) -> pd.DataFrame:
    """Layers in model order as given (dict order), each with its bin means."""
    frames = [series(v).assign(layer=name, order=i) for i, (name, v) in enumerate(layers.items())]
    return pd.concat(frames, ignore_index=True)[METRIC_COLUMNS]


def heat() -> pd.DataFrame:
    rows = []
    for order, layer in enumerate(["embed", "block.0", "head"]):
        for b in range(4):
            rows.append({"layer": layer, "order": order, "step_lo": 100 * b, "step_hi": 100 * b + 99,
                         "value": 10.0 ** (order - b), "inf": layer == "block.0" and b == 2})
    return pd.DataFrame(rows)[HEATMAP_COLUMNS].sample(frac=1, random_state=0)  # order must come from `order`


def spec(chart) -> dict:
    assert isinstance(chart, (alt.Chart, alt.LayerChart))
    return chart.to_dict()  # validates against the Vega-Lite schema


def walk(d, key: str):
    """Every value stored under `key` anywhere in a spec."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(d, list):
        for v in d:
            yield from walk(v, key)


def rows(s: dict) -> list[dict]:
    return [r for values in s.get("datasets", {}).values() for r in values]


def y_scales(s: dict) -> list:
    return [enc["y"].get("scale") for enc in walk(s, "encoding") if "y" in enc and "field" in enc["y"]]


def title(s: dict) -> str:
    t = s.get("title")
    return t if isinstance(t, str) else t.get("text", "")


EMPTY = [
    lambda: viz.loss_chart(pd.DataFrame(columns=SERIES_COLUMNS), pd.DataFrame(columns=MARKER_COLUMNS)),
    lambda: viz.loss_chart(pd.DataFrame(columns=SERIES_COLUMNS), None),
    lambda: viz.lr_chart({}),
    lambda: viz.lr_chart({"group 0": pd.DataFrame(columns=SERIES_COLUMNS)}),
    lambda: viz.grad_norm_chart(pd.DataFrame(columns=SERIES_COLUMNS), 1.0),
    lambda: viz.heatmap_chart(pd.DataFrame(columns=HEATMAP_COLUMNS)),
    lambda: viz.layer_lines_chart(pd.DataFrame(columns=METRIC_COLUMNS), "grad_norm"),
    lambda: viz.update_ratio_chart(pd.DataFrame(columns=METRIC_COLUMNS)),
    lambda: viz.fraction_chart(pd.DataFrame(columns=METRIC_COLUMNS), "dead_fraction"),
    lambda: viz.compare_chart({}, "mean", "Loss"),
    lambda: viz.compare_chart({"a": pd.DataFrame(columns=SERIES_COLUMNS)}, "mean", "Loss"),
]


@pytest.mark.parametrize("build", EMPTY)
def test_empty_frames_give_a_no_data_chart(build):
    assert title(spec(build())).endswith("no data yet")


def test_loss_chart_band_line_markers_and_log_scale():
    markers = pd.DataFrame({"step": [15, 25], "kind": ["nan_inf", "loss_spike"], "label": ["NaN in fc1", "spike"]})
    s = spec(viz.loss_chart(series([5.0, 2.0, 1.0, 0.5]), markers))
    marks = [layer["mark"]["type"] for layer in s["layer"]]
    assert marks == ["area", "line", "rule"]
    assert s["layer"][0]["encoding"]["y2"]["field"] == "max"
    color = s["layer"][2]["encoding"]["color"]
    assert color["field"] == "kind" and color["scale"]["domain"] == ["nan_inf", "loss_spike", "nonfinite"]
    assert any(t.get("field") == "label" for t in s["layer"][2]["encoding"]["tooltip"])
    assert y_scales(s)[0] == {"zero": False}
    log = spec(viz.loss_chart(series([100.0, 1.0, 0.01]), None))  # positive, four decades
    assert y_scales(log)[0] == {"type": "log"}
    negative = spec(viz.loss_chart(series([100.0, -1.0, 0.01]), None))
    assert y_scales(negative)[0] == {"zero": False}


def test_grad_norm_chart_draws_the_clip_threshold():
    s = spec(viz.grad_norm_chart(series([0.5, 3.0, 1.2]), clip=1.0))
    assert {"y": 1.0, "label": "clip at 1"} in rows(s)
    assert "rule" in [layer["mark"]["type"] for layer in s["layer"]]
    none = spec(viz.grad_norm_chart(series([0.5, 3.0]), clip=None))
    assert not any("label" in r for r in rows(none))


def test_lr_chart_one_line_per_group():
    s = spec(viz.lr_chart({"group 0": series([1e-3, 1e-3]), "group 1": series([1e-4, 5e-5])}))
    assert s["encoding"]["color"]["field"] == "group"
    assert {r["group"] for r in rows(s)} == {"group 0", "group 1"}


def test_heatmap_log_colour_model_order_and_inf_cells():
    s = spec(viz.heatmap_chart(heat()))
    cells, infs = s["layer"]
    assert cells["encoding"]["color"]["scale"]["type"] == "log"
    assert cells["mark"]["type"] == "rect" and infs["mark"]["color"] == viz.INF_COLOR
    for layer in (cells, infs):
        assert layer["encoding"]["y"]["sort"] == ["embed", "block.0", "head"]
        assert layer["encoding"]["x2"]["field"] == "step_end"
    assert "datum.inf" in str(infs["transform"])
    assert s["height"] >= 120
    assert spec(viz.heatmap_chart(heat().assign(inf=False)))["layer"][0]["mark"]["type"] == "rect"


def test_layer_lines_chart_colours_layers_in_model_order():
    s = spec(viz.layer_lines_chart(long({"z_first": [1.0, 2.0], "a_second": [0.001, 0.002]}), "grad_norm"))
    assert s["encoding"]["color"]["sort"] == ["z_first", "a_second"]
    assert s["encoding"]["y"]["scale"] == {"type": "log"}  # three decades
    many = long({f"l{i}": [1.0, 2.0] for i in range(viz.MAX_LEGEND + 1)})
    assert spec(viz.layer_lines_chart(many, "weight_norm"))["encoding"]["color"]["field"] == "order"


def test_layer_lines_chart_stays_logarithmic_with_an_exploding_layer_and_a_zero():
    """One layer at 3e13 beside healthy ones and a bin with no gradient (0): log y, the 0 left out."""
    s = spec(viz.layer_lines_chart(long({"net.0": [0.0, 1.0, 1.2], "net.10": [1.5, 2.0, 3e13]}), "grad_norm"))
    assert s["encoding"]["y"]["scale"] == {"type": "log"}
    data = next(iter(s["datasets"].values()))
    assert min(row["mean"] for row in data) == 1.0 and len(data) == 5


def test_heatmap_legend_reads_as_numbers():
    colours = list(walk(spec(viz.heatmap_chart(heat())), "color"))
    assert any(c.get("legend", {}).get("format") == ".1e" for c in colours if isinstance(c, dict))


def test_update_ratio_chart_log_scale_healthy_band_and_rule():
    s = spec(viz.update_ratio_chart(long({"fc1": [1e-3, 2e-3], "fc2": [0.0, 1e-5]})))
    marks = [layer["mark"]["type"] for layer in s["layer"]]
    assert marks == ["rect", "line", "rule", "text"]
    assert {"lo": 1e-4, "hi": 1e-2} in rows(s)
    assert {"y": 1e-3, "label": "healthy ~1e-3"} in rows(s)
    assert s["layer"][1]["encoding"]["y"]["scale"] == {"type": "log"}
    assert all(r["mean"] > 0 for r in rows(s) if "mean" in r)  # a 0 ratio has no place on a log axis


def test_fraction_chart_spans_zero_to_one():
    s = spec(viz.fraction_chart(long({"relu1": [0.1, 0.4], "relu2": [0.0, 0.9]}), "dead_fraction"))
    assert s["encoding"]["y"]["scale"] == {"domain": [0, 1]}
    assert "dead-unit fraction" in title(s).lower()


def test_compare_chart_one_colour_per_run():
    s = spec(viz.compare_chart({"run-a": series([3.0, 2.0]), "run-b": series([3.0, 1.0])}, "mean", "Loss"))
    assert s["encoding"]["color"]["field"] == "run" and s["encoding"]["y"]["field"] == "mean"
    assert title(s) == "Loss" and {r["run"] for r in rows(s)} == {"run-a", "run-b"}


def test_frames_from_a_real_view_draw(tmp_path):
    """The query layer's own frames (dtypes included) go through every builder."""
    from test_query import write_store  # tests/ is on sys.path, as for _models

    write_store(tmp_path / "run", 400)
    v = RunView(tmp_path / "run")
    for chart in (viz.loss_chart(v.series_binned("loss"), v.markers()),
                  viz.grad_norm_chart(v.series_binned("grad_norm"), 2.0),
                  viz.lr_chart({"group 0": v.series_binned("lr"), "group 1": v.series_binned("lr_1")}),
                  viz.heatmap_chart(v.heatmap()), viz.layer_lines_chart(v.metric_binned("grad_norm"), "grad_norm"),
                  viz.update_ratio_chart(v.metric_binned("update_ratio")),
                  viz.fraction_chart(v.metric_binned("dead_fraction"), "dead_fraction"),
                  viz.compare_chart({"a": v.series_binned("loss"), "b": v.series_binned("loss")}, "mean", "Loss")):
        assert not title(spec(chart)).endswith("no data yet")
