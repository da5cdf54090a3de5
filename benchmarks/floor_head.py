"""The bare training step of a head, for ``benchmarks/floor.py``: the PyTorch loop of an MLP head
on features held on the device (``head_step``) and its floor, the summed ceiling of the step's own
operations (``head_op_ceiling``)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

import _common  # noqa: F401  (puts src/ on the path when needed)

import torch
from torch import nn

from scenesweep.compute import numerics  # the runs' process settings

from floor_device import resolve_device, sync


@dataclasses.dataclass
class HeadStep:
    """Step times of a bare PyTorch loop training one MLP head.

    Attributes:
        widths: layer widths, input first, classes last (e.g. (25088, 1024, 1024, 15)).
        dropout, batch_size, device, optimizer: the setting.
        seconds: each timed step (warm-up left out).
    """

    widths: tuple[int, ...]
    dropout: float
    batch_size: int
    device: str
    optimizer: str
    seconds: list[float]
    settings: dict = dataclasses.field(default_factory=lambda: process_settings())
    op_ceiling: dict[str, float] | None = None  # head_op_ceiling's parts, when measured

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def op_ceiling_s(self) -> float | None:
        return sum(self.op_ceiling.values()) if self.op_ceiling else None

    @property
    def floor_s(self) -> float:
        """The step time no run of this head can beat: the summed-op ceiling when measured (never
        above the bare loop's best), else the bare loop's best step."""
        return min(self.min_s, self.op_ceiling_s) if self.op_ceiling else self.min_s

    def as_dict(self) -> dict:
        return {"widths": list(self.widths), "dropout": self.dropout, "batch_size": self.batch_size,
                "device": self.device, "optimizer": self.optimizer, "median_s": self.median_s,
                "min_s": self.min_s, "op_ceiling_s": self.op_ceiling_s, "op_ceiling": self.op_ceiling,
                "floor_s": self.floor_s, "steps": len(self.seconds), **self.settings}


def head_op_ceiling(widths: Sequence[int], batch_size: int, device: torch.device, repeats: int = 100) -> dict[str, float]:
    """Seconds of each operation of one training step of the MLP ``widths`` at ``batch_size``,
    each timed alone at its best of ``repeats`` (round-robin), into buffers reused from call to
    call: per Linear, the forward GEMM (B, in) x (in, out), the weight gradient (out, B) x (B, in),
    the input gradient (B, out) x (out, in) but for the first layer (the features need none); then
    the fused Adam update of every parameter. ReLU, dropout and the loss on (B, hidden) are left
    out (microseconds), as are allocation and page faults: no loop of this head beats the sum."""
    torch.manual_seed(0)
    calls: dict[str, callable] = {}
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:]), 1):
        x = torch.randn(batch_size, width_in, device=device)  # (B, in)
        weight = torch.randn(width_out, width_in, device=device)  # (out, in)
        dy = torch.randn(batch_size, width_out, device=device)  # (B, out)
        y, dw, dx = (torch.empty(batch_size, width_out, device=device), torch.empty_like(weight),
                     torch.empty_like(x))
        calls[f"fc{index} forward"] = lambda x=x, w=weight, y=y: torch.mm(x, w.t(), out=y)
        calls[f"fc{index} weight gradient"] = lambda x=x, dy=dy, dw=dw: torch.mm(dy.t(), x, out=dw)
        if index > 1:
            calls[f"fc{index} input gradient"] = lambda w=weight, dy=dy, dx=dx: torch.mm(dy, w, out=dx)
    model = mlp(widths).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    optimizer.step()  # Adam's state allocated and touched before timing
    calls["Adam update (fused)"] = optimizer.step
    best = {name: float("inf") for name in calls}
    for _ in range(repeats + 1):  # the first round warms up
        for name, call in calls.items():
            sync(device)
            began = time.perf_counter()
            call()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - began)
    return best


def process_settings() -> dict:
    """What this process runs under that changes a step's time: scenesweep's numerics settings."""
    return {"flush_denormals": bool(numerics.FLUSHES_DENORMALS),
            "huge_page_allocations": bool(numerics.HUGE_PAGE_ALLOCATIONS)}


def mlp(widths: Sequence[int], dropout: float = 0.5) -> nn.Sequential:
    """(Linear, ReLU, Dropout) per hidden width, then Linear: the study's head for (D, h1, h2, C)."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def head_step(widths: Sequence[int] = (25088, 1024, 1024, 15), batch_size: int = 8, dropout: float = 0.5,
              device: str | torch.device = "auto", steps: int = 20, warmup: int = 3, rows: int = 1200,
              lr: float = 1e-3, seed: int = 0, features: torch.Tensor | None = None,
              op_ceiling: bool = True) -> HeadStep:
    """Step times of the bare loop: index a batch, forward, cross-entropy, backward, Adam.

    The features are one (rows, D) float32 tensor on the device (1200 rows: the study's training
    split; random normal values unless ``features`` gives them), a batch is a random index into
    it, as a loop over cached features does.

    Args:
        widths: (D, hidden..., n_classes).
        batch_size: rows per step.
        dropout: after each hidden layer.
        device: "auto", "cpu", "cuda" or a torch.device.
        steps, warmup: timed and untimed steps.
        rows: rows of the feature tensor the batches are drawn from.
        lr: Adam's learning rate (does not change the time).
        seed: of the weights, features and batches.
        features: (N, D) real features to step on instead of random ones (``rows`` is then N).
        op_ceiling: also measure ``head_op_ceiling`` (the floor) after the loop.
    """
    if len(widths) < 2:
        raise ValueError(f"widths={widths!r}: expected (input, [hidden...,] classes)")
    device = resolve_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = mlp(widths, dropout).to(device).train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    if features is None:
        features = torch.randn(rows, widths[0], generator=generator)  # (rows, D)
    features = features.to(device=device, dtype=torch.float32)
    rows = len(features)
    labels = torch.randint(0, widths[-1], (rows,), generator=generator).to(device)  # (rows,)
    seconds = []
    for step in range(warmup + steps):
        index = torch.randint(0, rows, (batch_size,), generator=generator).to(device)  # (B,)
        sync(device)
        began = time.perf_counter()
        logits = model(features[index])  # (B, n_classes)
        loss = loss_fn(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - began)
    del model, optimizer, features  # the ceiling's own buffers in their place
    ceiling = head_op_ceiling(widths, batch_size, device) if op_ceiling else None
    return HeadStep(tuple(int(w) for w in widths), float(dropout), int(batch_size), str(device),
                    f"Adam(fused={fused})", seconds, op_ceiling=ceiling)
