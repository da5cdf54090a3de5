"""The MLP head's network, and its first layer that keeps its weight gradient in one buffer.

Why the first layer is not a plain ``nn.Linear``: on the CPU a head step is bound by page faults,
not by arithmetic. Autograd allocates the first layer's weight gradient afresh at every step (the
study's pool5 head: 1024 x 25088 floats, 100 MB); glibc maps every block over 32 MB from the kernel
and unmaps it when freed, so each 4 KiB page of it faults on first touch: 25,000 faults a step.
Measured on an AMD EPYC Zen 3, 2 cores (``benchmarks/huge_pages.py``), batch 8, fused Adam: the plain
layer steps in 88-91 ms on 4 KiB pages; written into a buffer kept across steps, 51 ms, the
same as the plain layer on transparent huge pages, with the same losses bit for bit.

Huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``) are not the way: every large allocation of the
process then takes 2 MiB pages, and on a virtual machine that reports free memory to its host
(virtio-balloon's free page reporting, this machine's kind) a fresh huge page is one the host
must fault in again. Building VGG16 with random weights took 9.5 s instead of 1.5 s, and with
fc6/fc7 16384 wide, 29 s instead of 6.3 s.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import torch
from torch import nn


class _LinearIntoKeptGrad(torch.autograd.Function):
    """``addmm(bias, x, weight.t())`` whose weight gradient is written into ``layer.kept_grad``
    (and, under autocast, computed in a kept low-precision buffer, then copied into it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, layer: "KeptGradLinear") -> torch.Tensor:
        # As autocast runs nn.Linear: input, weight and bias cast to its dtype, addmm in it.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            weight = layer.weight.detach()
            if dtype != weight.dtype:
                weight = layer.low_precision_weight(dtype)  # (out, in), copied from the fp32 weight
            ctx.layer, ctx.x_dtype, ctx.bias_dtype = layer, x.dtype, bias.dtype
            x = x.to(dtype)  # (B, in)
            ctx.save_for_backward(x, weight)
            return torch.addmm(bias.detach().to(dtype), x, weight.t())  # (B, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        # Autograd's own formula for addmm's second matrix: (out, B) @ (B, in), into the buffer.
        if grad_out.dtype == layer.weight.dtype:
            torch.mm(grad_out.t(), x, out=layer.kept_grad)
        else:
            layer.kept_grad.copy_(torch.mm(grad_out.t(), x, out=layer.kept_low_grad(grad_out.dtype)))
        layer.weight.grad = layer.kept_grad
        grad_x = grad_out.mm(weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_out.sum(0).to(ctx.bias_dtype), None


class KeptGradLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient lands in the same buffer at every training step on the
    CPU (the module's docstring says why). Elsewhere (evaluation, inference, a GPU, whose caching
    allocator reuses memory anyway) it is ``nn.Linear``; its state_dict is ``nn.Linear``'s.

    The buffers are not part of the module's state: not pickled, freed by ``release_buffers``.
    """

    kept_grad: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and self.bias is not None
                and x.device.type == "cpu" and x.dim() == 2):
            return super().forward(x)
        if self.kept_grad is None:
            self.kept_grad = torch.empty_like(self.weight)
        return _LinearIntoKeptGrad.apply(x, self.bias, self)

    def low_precision_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, copied into a buffer kept across steps (autocast's cast)."""
        kept = self.__dict__.get("_kept_weight")
        if kept is None or kept.dtype != dtype:
            kept = self.__dict__["_kept_weight"] = torch.empty_like(self.weight, dtype=dtype)
        return kept.copy_(self.weight.detach())

    def kept_low_grad(self, dtype: torch.dtype) -> torch.Tensor:
        kept = self.__dict__.get("_kept_low_grad")
        if kept is None or kept.dtype != dtype:
            kept = self.__dict__["_kept_low_grad"] = torch.empty_like(self.weight, dtype=dtype)
        return kept

    def release_buffers(self) -> None:
        """Free the kept buffers (a trained head keeps none: 100 MB or more each)."""
        for name in ("kept_grad", "_kept_weight", "_kept_low_grad"):
            self.__dict__.pop(name, None)
        self.weight.grad = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("kept_grad", "_kept_weight", "_kept_low_grad"):
            state.pop(name, None)
        return state


def build_mlp(in_features: int, hidden: tuple[int, ...], dropout: float, n_classes: int) -> nn.Sequential:
    """The study's head: (Linear, ReLU, Dropout) per hidden width, then Linear to the classes;
    the first Linear (the widest: pool5's 25088 inputs) keeps its weight gradient."""
    layers: list[nn.Module] = []
    width = in_features
    for index, out in enumerate(hidden):
        linear = KeptGradLinear(width, out) if index == 0 else nn.Linear(width, out)
        layers += [linear, nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = out
    layers.append(KeptGradLinear(width, n_classes) if not hidden else nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def release_buffers(model: nn.Module) -> None:
    """Every ``KeptGradLinear``'s buffers freed, and every gradient (a trained head keeps none)."""
    for module in model.modules():
        if isinstance(module, KeptGradLinear):
            module.release_buffers()
    for parameter in model.parameters():
        parameter.grad = None
