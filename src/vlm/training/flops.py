"""Model FLOPs of a training step, counted by torch on the ops that run, and the peak FLOP/s of a device.

`PartFlopCounter` wraps `torch.utils.flop_counter.FlopCounterMode` around a real forward and backward
and splits its count over the model's parts. Because it counts the ops as they run, a frozen part
shows no weight-gradient matmuls, a frozen part at the start of the graph (an encoder fed pixels) has
no backward at all, and the auxiliary heads count with what they cost. Only ops with a FLOP formula
count: matmuls, convolutions and attention. Attention counts its full score matrix even when causal
(torch's convention, and the one MFU figures are usually quoted in). With activation checkpointing
the recomputed forward counts too, as it runs, so MFU then reads as hardware FLOPs utilisation.

Counting costs a Python call per op, so `StepFlopCache` counts a batch shape once and predicts the
rest (see there). `peak_flops` gives the denominator of MFU: a datasheet table for GPUs and a timed
matmul on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from fractions import Fraction
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.flop_counter import FlopCounterMode

from vlm.contracts import Batch, TiledViews

log = logging.getLogger(__name__)
aten = torch.ops.aten
OTHER = "other"  # ops outside every part (e.g. in the loss)


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """q @ k^T and p @ v: 2 * b * h * s_q * s_k * (d_qk + d_v), the causal mask ignored."""
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d_qk + d_v)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """As torch counts its GPU kernels' backward: scores recomputed, then grads of p, v, q and k."""
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (3 * d_qk + 2 * d_v)


# torch's table has the CUDA attention kernels but not the CPU one, which would count as zero
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a module's output: a tensor, or sequences, dicts and dataclasses (TiledViews) of them."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for field in dataclasses.fields(value) for t in _tensors(getattr(value, field.name))]
    return []


def model_parts(module: nn.Module) -> dict[str, nn.Module]:
    """The parts FLOPs are reported for: the children of `module.model` (encoder, resampler, projector,
    llm) and `module`'s other children with parameters (the auxiliary heads; not the metrics)."""
    parts = dict(module.model.named_children())
    parts.update(
        (name, child)
        for name, child in module.named_children()
        if name != "model" and any(True for _ in child.parameters())
    )
    return parts


class PartFlopCounter:
    """FLOPs of the ops run inside the context (forward and backward), per part.

    An op counts for the part whose forward is running; in backward, for the part whose outputs' gradients
    were completed last (backward runs the parts one after another, from the loss back). Submodules are
    hooked too, so a part called through a method (`ctc_head.loss`) still counts. `flops`: {part: FLOPs},
    `OTHER` for ops outside every part.
    """

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.parts = parts
        self.flops: Counter[str] = Counter()
        self._counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        self._current, self._counted = OTHER, 0
        self._depth: Counter[str] = Counter()
        self._resume: dict[str, str] = {}  # part -> where to credit ops after its forward
        self._handles: list = []

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def _credit_to(self, part: str) -> None:
        """Credit the FLOPs since the last switch to the current part, then switch to `part`."""
        counted = self._counter.get_total_flops()
        self.flops[self._current] += counted - self._counted
        self._counted, self._current = counted, part

    def _pre_forward(self, part: str, module: nn.Module, args) -> None:
        if self._depth[part] == 0:
            self._resume[part] = self._current  # a recomputed forward in backward returns to it
            self._credit_to(part)
        self._depth[part] += 1

    def _post_forward(self, part: str, module: nn.Module, args, output) -> None:
        self._depth[part] -= 1
        if self._depth[part]:
            return
        self._credit_to(self._resume.pop(part))
        # an input passed through (resampler=identity) marks where the part before it ends, not this part
        inputs = {id(t) for t in _tensors(args)}
        outputs = [t for t in _tensors(output) if t.requires_grad and id(t) not in inputs]
        if outputs:
            self._handles.append(register_multi_grad_hook(outputs, lambda grads: self._credit_to(part)))

    def __enter__(self) -> PartFlopCounter:
        for name, part in self.parts.items():
            for module in part.modules():
                self._handles.append(module.register_forward_pre_hook(partial(self._pre_forward, name)))
                self._handles.append(module.register_forward_hook(partial(self._post_forward, name)))
        self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._counter.__exit__(*exc)
        self._credit_to(OTHER)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # every part in order, those without FLOPs (pixel shuffle) too; OTHER only when it has some
        other = {OTHER: self.flops[OTHER]} if self.flops[OTHER] else {}
        self.flops = Counter({name: self.flops[name] for name in self.parts} | other)


def batch_shape(batch: Batch) -> tuple[tuple, int]:
    """(group, sequence length) of a training batch: the group (rows, image tensor shapes) fixes the
    cost of every part but the length's."""
    pixels = batch["pixel_values"]
    views = (pixels.global_views, pixels.tiles) if isinstance(pixels, TiledViews) else (pixels,)
    input_ids = batch["input_ids"]
    return (input_ids.shape[0], *(tuple(v.shape) for v in views)), input_ids.shape[1]


def _polynomial(points: list[tuple[int, dict[str, int]]], length: int) -> dict[str, Fraction]:
    """Each part's FLOPs at `length` on the polynomial through `points` (Lagrange, in exact fractions)."""
    result = {}
    for name in {name for _, flops in points for name in flops}:
        value = Fraction(0)
        for i, (x_i, flops) in enumerate(points):
            weight = Fraction(1)
            for j, (x_j, _) in enumerate(points):
                if j != i:
                    weight *= Fraction(length - x_j, x_i - x_j)
            value += weight * flops.get(name, 0)
        result[name] = value
    return result


class StepFlopCache:
    """FLOPs per part of a training step by batch shape: counted for new shapes, predicted for the rest.

    Right padding to the longest sample gives nearly every batch its own length, so counting each new
    shape would count most steps. Within a group (same rows and images) a transformer's step costs a
    polynomial of degree 2 in the sequence length (projections linear, attention scores quadratic).
    After three lengths of a group are counted, the others follow from the polynomial through them; the
    fourth counted length checks it exactly, and a group that fails the check (a cost that is not such
    a polynomial) is counted at every new length instead.
    """

    def __init__(self) -> None:
        self.points: dict[tuple, dict[int, dict[str, int]]] = {}
        self.fitted: set[tuple] = set()
        self.not_polynomial: set[tuple] = set()

    def get(self, group: tuple, length: int) -> dict[str, int] | None:
        """The step's FLOPs per part, or None when this shape has to be counted."""
        points = self.points.get(group, {})
        if length in points:
            return points[length]
        if group in self.fitted:
            predicted = _polynomial(list(points.items())[:3], length)
            return {name: round(value) for name, value in predicted.items()}
        return None

    def add(self, group: tuple, length: int, flops: dict[str, int]) -> None:
        """Store a counted step; on a group's fourth length, check the polynomial through the first three."""
        points = self.points.setdefault(group, {})
        points[length] = dict(flops)
        if len(points) == 4 and group not in self.not_polynomial:
            predicted = _polynomial(list(points.items())[:3], length)
            if all(predicted.get(name, 0) == flops.get(name, 0) for name in predicted.keys() | flops.keys()):
                self.fitted.add(group)
            else:
                self.not_polynomial.add(group)
                log.info(
                    "FLOPs of batch shape %s are not quadratic in the length: counting each new one", group
                )


# Dense peak TFLOP/s (no 2:4 sparsity) per training precision from the vendors' datasheets. NVIDIA quotes
# Hopper, L4, L40S and the A-series tensor figures "with sparsity"; the dense figure is half of it.
# bf16/fp16: tensor cores with fp32 accumulation; tf32: tensor cores; fp32: without tensor cores.
# None: the GPU has no tensor cores for that format. Matched in order against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float | None]]] = [
    # H200 datasheet: SXM 1,979 bf16/fp16, 989 tf32 (sparse), 67 fp32; NVL 1,671, 835, 60
    (r"H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    # H100 datasheet: SXM 1,979, 989, 67; PCIe 1,513, 756, 51; NVL 1,671, 835, 60
    (r"H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (r"H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    # A100 datasheet (SXM4 and PCIe alike): 312 bf16/fp16, 156 tf32 dense, 19.5 fp32
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # A10G (AWS G5): NVIDIA publishes no datasheet; 70 bf16/fp16, 35 tf32, 35 fp32 are the figures
    # quoted for it (e.g. Baseten, "NVIDIA A10 vs A10G"); set `peak_flops` if yours differ
    (r"A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    # A10 datasheet: 125 bf16/fp16, 62.5 tf32 dense, 31.2 fp32
    (r"A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # L40S datasheet: 362.05 bf16/fp16 and 183 tf32 dense (733 and 366 sparse), 91.6 fp32
    (r"L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    # L4 datasheet: 242 bf16/fp16, 120 tf32 (sparse), 30.3 fp32
    (r"L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # Ada (AD102) whitepaper, RTX 4090: 165.2 fp16/bf16 with fp32 accumulate, 82.6 tf32, 82.6 fp32
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    # Ampere GA102 whitepaper, RTX 3090: 71 fp16/bf16 with fp32 accumulate, 35.6 tf32, 35.6 fp32
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    # V100 datasheet: fp16 tensor 130 (V100S PCIe), 112 (PCIe), 125 (SXM2); fp32 16.4, 14, 15.7; no bf16, tf32
    (r"V100S", {"bf16": None, "fp16": 130.0, "tf32": None, "fp32": 16.4}),
    (r"V100-PCIE", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"V100", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),
    # T4 datasheet: 65 fp16 (mixed precision), 8.1 fp32; no bf16, tf32
    (r"T4", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
]


def precision_format(precision: str, device: torch.device) -> str | None:
    """The number format a Lightning precision ("bf16-mixed", "32-true", ...) multiplies in on `device`:
    bf16, fp16, tf32 (fp32 matmuls on CUDA when torch allows TF32), fp32, or None (e.g. 64-true)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if precision.startswith("32"):
        tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return "tf32" if tf32 else "fp32"
    return None


def gpu_peak_flops(device_name: str, number_format: str) -> float | None:
    """Dense peak FLOP/s of one GPU from `GPU_PEAK_TFLOPS`, None when the GPU or format is not there."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"\b{pattern}\b", device_name, re.IGNORECASE):
            tflops = peaks[number_format]
            return tflops * 1e12 if tflops is not None else None
    return None


_CPU_PEAKS: dict[tuple[int, torch.dtype], float] = {}


def cpu_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 10) -> float:
    """Measured FLOP/s of a (size x size) matmul on this CPU with torch's current thread count: the best
    of `repeats` after a warm-up, measured once per process, thread count and dtype."""
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAKS:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        _CPU_PEAKS[key] = 2 * size**3 / best
    return _CPU_PEAKS[key]


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device at the training precision, where the figure comes from); None when
    there is no figure for this device and precision."""
    number_format = precision_format(precision, device)
    if number_format is None:
        return None, f"trainer.precision={precision}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name, number_format), f"{name} {number_format} datasheet peak"
    if device.type == "cpu":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[number_format]
        threads = torch.get_num_threads()
        return cpu_matmul_peak(dtype), f"measured {number_format} matmul on {threads} CPU thread(s)"
    return None, f"{device.type} device"
