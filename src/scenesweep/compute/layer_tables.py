"""The study's Q1 table (every layer with its channels, weight and bias counts and output size),
built from a network on the meta device: nothing computed, nothing downloaded.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the study's Q1 table."""

    index: int
    name: str
    kind: str
    in_channels: int
    out_channels: int
    weights: int
    biases: int
    output_size: str


def _shape_text(shape: tuple[int, ...]) -> tuple[int, str]:
    """(channels or width, output size) of one part's output: (N, C, h, w), (N, T, D) or (N, D)."""
    if len(shape) == 4:
        return shape[1], f"{shape[2]} x {shape[3]}"
    if len(shape) == 3:
        return shape[2], f"{shape[1]} x {shape[2]}"
    return shape[-1], f"1 x {shape[-1]}"


def stage_table(model: nn.Module, parts: list[tuple[str, nn.Module]], image_size: int) -> list[LayerRow]:
    """One row per part (forward hooks on the meta device: nothing computed); parameters held by
    the network itself (ViT's class token) in a last row, so that the rows sum to the total."""
    seen: dict[str, tuple[int, str, int]] = {}
    handles = []
    for name, module in parts:
        def hook(module, inputs, output, name=name) -> None:
            channels_in = _shape_text(tuple(inputs[0].shape))[0] if inputs else 0
            channels_out, size = _shape_text(tuple(output.shape))
            seen[name] = (channels_in, size, channels_out)
        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    rows: list[LayerRow] = []
    for name, module in parts:
        weights = sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
        biases = sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))
        channels_in, size, channels_out = seen.get(name, (0, "-", 0))
        rows.append(LayerRow(len(rows) + 1, name, type(module).__name__, channels_in, channels_out, weights,
                             biases, size))
    listed = {id(p) for _, module in parts for p in module.parameters()}
    own = [(n, p) for n, p in model.named_parameters() if id(p) not in listed]
    if own:
        rows.append(LayerRow(len(rows) + 1, ", ".join(n for n, _ in own), "Parameter", 0, 0,
                             sum(p.numel() for n, p in own if not n.endswith("bias")),
                             sum(p.numel() for n, p in own if n.endswith("bias")), "-"))
    return rows


def vgg_layer_table(model: nn.Module, image_size: int = 224) -> list[LayerRow]:
    """The study's Q1 table: every conv, pool and fc layer of a VGG."""
    rows: list[LayerRow] = []
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    conv_index = 0
    block = 1
    with torch.inference_mode():
        for module in model.features:
            x = module(x)
            if isinstance(module, nn.Conv2d):
                conv_index += 1
                rows.append(LayerRow(len(rows) + 1, f"conv{block}_{conv_index}", "Convolution",
                                     module.in_channels, module.out_channels, module.weight.numel(),
                                     module.bias.numel(), f"{x.shape[2]} x {x.shape[3]}"))
            elif not isinstance(module, nn.ReLU):
                channels = x.shape[1]
                rows.append(LayerRow(len(rows) + 1, f"pool{block}", type(module).__name__, channels,
                                     channels, 0, 0, f"{x.shape[2]} x {x.shape[3]}"))
                block += 1
                conv_index = 0
        fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
        for number, module in zip((6, 7, 8), fcs):
            rows.append(LayerRow(len(rows) + 1, f"fc{number}", "Fully connected", module.in_features,
                                 module.out_features, module.weight.numel(), module.bias.numel(),
                                 f"1 x {module.out_features}"))
    return rows


def format_layer_table(rows: list[LayerRow]) -> str:
    """The Q1 table as Markdown, with the totals."""
    lines = ["| # | layer | type | in | out | weights | biases | output |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.index} | {r.name} | {r.kind} | {r.in_channels} | {r.out_channels} | "
                     f"{r.weights:,} | {r.biases:,} | {r.output_size} |")
    weights = sum(r.weights for r in rows)
    biases = sum(r.biases for r in rows)
    lines.append(f"\nTotal: {weights + biases:,} parameters ({weights:,} weights + {biases:,} biases)")
    return "\n".join(lines)
