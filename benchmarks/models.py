"""The three CPU models of the overhead benchmark (benchmarks/RESULTS.md, "Training overhead, CPU"), in plain torch,
with their synthetic batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    """784-1024x4-10, ReLU: 10 tensors, 4.0M parameters."""
    dims = [784, 1024, 1024, 1024, 1024, 10]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y + x) if self.residual else F.relu(y)


class SmallResNet(nn.Module):
    """8 conv-BN-ReLU layers with identity shortcuts where shapes allow: 26 tensors, 0.56M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        spec = [(3, 32, 2, False), (32, 32, 1, True), (32, 32, 1, True), (32, 64, 2, False),
                (64, 64, 1, True), (64, 64, 1, True), (64, 192, 2, False), (192, 192, 1, True)]
        self.features = nn.Sequential(*[ConvBNReLU(*s) for s in spec])
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class TinyEncoder(nn.Module):
    """A 4-layer TransformerEncoder, d=256, 4 heads, GELU, with embeddings and an LM head:
    54 tensors, 3.7M parameters."""

    def __init__(self, vocab: int = 1000, d: int = 256, seq: int = 128, depth: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h)))


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    describe: str


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-4)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def workloads(transformer_batch: int = 16, transformer_seq: int = 128) -> list[Workload]:
    def mlp_batch(g, dev):
        return torch.randn(256, 784, generator=g).to(dev), torch.randint(0, 10, (256,), generator=g).to(dev)

    def cnn_batch(g, dev):
        return torch.randn(64, 3, 32, 32, generator=g).to(dev), torch.randint(0, 10, (64,), generator=g).to(dev)

    def tr_batch(g, dev):
        t = torch.randint(0, 1000, (transformer_batch, transformer_seq + 1), generator=g)
        return t[:, :-1].contiguous().to(dev), t[:, 1:].contiguous().to(dev)

    return [
        Workload("MLP", mlp, mlp_batch, _ce, _sgd, "784-1024x4-10 ReLU, batch 256, SGD+momentum"),
        Workload("CNN", SmallResNet, cnn_batch, _ce, _sgd,
                 "8 conv-BN-ReLU (ResNet-style shortcuts), 3x32x32, batch 64, SGD+momentum"),
        Workload("Transformer", lambda: TinyEncoder(seq=transformer_seq), tr_batch, _ce, _adamw,
                 f"4-layer TransformerEncoder d=256 GELU, seq {transformer_seq}, batch {transformer_batch}, AdamW"),
    ]
