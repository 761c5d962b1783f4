"""Small models and naive reference computations shared by the correctness tests.

Everything here is independent of gradwatch's internals: layers are found with a plain walk over
`named_modules()` / `parameters(recurse=False)`, and norms are computed in float64 with
`torch.linalg.vector_norm`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

ROOT = "(root)"


# ---- naive references ---------------------------------------------------------------------------
def naive_layers(model: nn.Module, trainable_only: bool = False) -> dict[str, list[nn.Parameter]]:
    """name -> the parameters that module owns directly (the README's definition of a layer)."""
    out = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if trainable_only:
            own = [p for p in own if p.requires_grad]
        if own:
            out[name or ROOT] = own
    return out


def norm64(tensors) -> float:
    """L2 norm of the concatenation of `tensors`, in float64."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return float("nan")
    parts = torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in tensors])
    return float(torch.linalg.vector_norm(parts))


def maxabs64(tensors) -> float:
    return max(float(t.detach().double().abs().max()) for t in tensors if t is not None)


def unique_params(params) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def layer_grad_norms(layers: dict, scale: float = 1.0) -> dict[str, float]:
    return {name: norm64([p.grad for p in ps]) / scale
            for name, ps in layers.items() if any(p.grad is not None for p in ps)}


def layer_grad_maxabs(layers: dict, scale: float = 1.0) -> dict[str, float]:
    return {name: maxabs64([p.grad for p in ps]) / scale
            for name, ps in layers.items() if any(p.grad is not None for p in ps)}


def layer_weight_norms(layers: dict) -> dict[str, float]:
    return {name: norm64(ps) for name, ps in layers.items()}


def total_grad_norm(layers: dict, scale: float = 1.0) -> float:
    params = unique_params(p for ps in layers.values() for p in ps)
    return norm64([p.grad for p in params]) / scale


def snapshot(layers: dict) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach().clone() for p in ps] for name, ps in layers.items()}


def update_ratios(layers: dict, before: dict) -> dict[str, float]:
    out = {}
    for name, ps in layers.items():
        delta = norm64([p.detach() - b for p, b in zip(ps, before[name])])
        out[name] = delta / norm64(before[name])
    return out


# ---- reading a run -------------------------------------------------------------------------------
def metric_table(run, metric: str) -> dict[int, dict[str, float]]:
    """step -> {layer: value} from the long `run.layers` frame (only the rows that exist)."""
    df = run.layers
    df = df[df["metric"] == metric]
    out: dict[int, dict[str, float]] = {}
    for step, layer, value in zip(df["step"], df["layer"].astype(str), df["value"]):
        out.setdefault(int(step), {})[layer] = float(value)
    return out


def assert_table_close(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]],
                       rtol: float = 1e-5, atol: float = 0.0, what: str = "") -> None:
    """Same steps, same layers per step, and every value within tolerance."""
    assert sorted(got) == sorted(expected), f"{what}: recorded steps {sorted(got)} != expected {sorted(expected)}"
    for step in expected:
        assert set(got[step]) == set(expected[step]), (
            f"{what} step {step}: layers {sorted(got[step])} != expected {sorted(expected[step])}")
        for layer, exp in expected[step].items():
            val = got[step][layer]
            if math.isinf(exp):
                assert val == exp, f"{what} step {step} layer {layer}: {val} != {exp}"
            else:
                assert math.isclose(val, exp, rel_tol=rtol, abs_tol=atol), (
                    f"{what} step {step} layer {layer}: recorded {val!r}, reference {exp!r}")


def close(a: float, b: float, rtol: float = 1e-5, atol: float = 0.0) -> bool:
    return bool(np.isclose(a, b, rtol=rtol, atol=atol))


# ---- models --------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.head(self.gap(x).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)))


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding weight shared with the output projection."""

    def __init__(self, vocab: int = 12, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


def task(kind: str):
    """(model, make_batch, loss_fn) for one of the model families."""
    if kind == "mlp":
        model = mlp()
        return model, lambda: (torch.randn(8, 6), torch.randint(0, 3, (8,))), nn.functional.cross_entropy
    if kind == "cnn":
        model = CNN()
        return model, lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))), nn.functional.cross_entropy
    if kind == "transformer":
        model = TinyTransformer()

        def batch():
            t = torch.randint(0, 20, (3, 6))
            return t, t.roll(1, dims=1)

        return model, batch, lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if kind == "lstm":
        model = LSTMModel()
        return model, lambda: (torch.randn(4, 7, 5), torch.randint(0, 2, (4,))), nn.functional.cross_entropy
    raise ValueError(kind)
