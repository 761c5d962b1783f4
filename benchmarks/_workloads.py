"""Benchmark workloads: small, realistic CPU-sized models with in-memory data.

Each workload is a function registered in `WORKLOADS` that returns a `Workload`: a freshly
initialised model, a fixed list of batches (reused cyclically, so data loading never shows up
in the timings) and a loss function. Add a row by decorating another builder with `@workload`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

# A handful of distinct batches is enough to keep every step from seeing identical inputs
# (which would let caches or the allocator flatter the baseline) without costing memory.
N_BATCHES = 4


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr: float = 1e-3

    def to(self, device: torch.device) -> Workload:
        self.model.to(device)
        self.batches = [(x.to(device), y.to(device)) for x, y in self.batches]
        return self


WORKLOADS: dict[str, Callable[[], Workload]] = {}


def workload(fn: Callable[[], Workload]) -> Callable[[], Workload]:
    WORKLOADS[fn.__name__] = fn
    return fn


def _classification_batches(shape: tuple[int, ...], n_classes: int, gen: torch.Generator):
    return [(torch.randn(shape, generator=gen), torch.randint(0, n_classes, (shape[0],), generator=gen))
            for _ in range(N_BATCHES)]


@workload
def mlp() -> Workload:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    return Workload("mlp", "MLP 784-512-256-10, batch 128", model,
                    _classification_batches((128, 784), 10, gen), nn.functional.cross_entropy)


@workload
def cnn() -> Workload:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        # Not inplace ReLU: full backward hooks (used by torchmortem) reject inplace outputs.
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )
    return Workload("cnn", "CNN 3x(conv3x3+BN+ReLU) 16-32-64 ch on 3x32x32, batch 64", model,
                    _classification_batches((64, 3, 32, 32), 10, gen), nn.functional.cross_entropy)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 seq_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.1,
                                           batch_first=True)
        # enable_nested_tensor only matters for padded inference; off avoids its warning.
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens) + self.pos)))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@workload
def transformer() -> Workload:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    vocab, seq, batch = 1000, 64, 16
    batches = []
    for _ in range(N_BATCHES):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return Workload("transformer", "TransformerEncoder 2 layers, d_model 128, 4 heads, seq 64, batch 16, "
                    "vocab 1000", TinyTransformer(vocab, seq_len=seq), batches, _lm_loss)
