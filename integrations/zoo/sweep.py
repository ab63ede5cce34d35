"""Sweep :func:`~rebasin_callbacks.trace_spec` over timm and torchvision classifiers.

Every model is randomly initialised (no weights are downloaded) and traced on a small input. For each one
the sweep records the groups found, the fraction of parameter elements on a permuted axis
(``spec.coverage``), the float64 relative output error of an independent
:func:`~rebasin_callbacks.check_spec` (a fresh seed, a fresh input, every group permuted at once, constant
parameters randomised), the boundaries reported, and the trace time. Any error above the float64 tolerance
(1e-9) is a real change of the function: the sweep then exits non-zero.

Run:
    python -m integrations.zoo.sweep --out docs/coverage.md              # the full sweep
    python -m integrations.zoo.sweep --only resnet18 tv.vgg11_bn          # a few models

Example:
    >>> from integrations.zoo.sweep import MODELS, sweep_one
    >>> row = sweep_one(next(m for m in MODELS if m.name == "tv.mobilenet_v3_small"))  # doctest: +SKIP
    >>> row.preserved  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rebasin_callbacks.trace import SpecCheckError, check_spec, trace_spec
from rebasin_callbacks.verify import DEFAULT_RTOL

#: An error above this is a real change of the function, not float64 round-off.
RTOL = DEFAULT_RTOL[torch.float64]


@dataclass(frozen=True)
class ZooModel:
    """One entry of the sweep: ``name`` is the timm name, or ``tv.<name>`` for torchvision."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 64  # input height and width
    family: str = ""

    @property
    def source(self) -> str:
        return "torchvision" if self.name.startswith("tv.") else "timm"

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.source == "torchvision":
            import torchvision

            return torchvision.models.get_model(self.name[3:], weights=None, num_classes=10, **self.kwargs)
        import timm

        return timm.create_model(self.name, pretrained=False, num_classes=10, **self.kwargs)


_VIT = {"img_size": 64}
MODELS: list[ZooModel] = [
    # ---- timm
    ZooModel("resnet18", family="resnet"),
    ZooModel("resnet50", family="resnet"),
    ZooModel("resnet26d", family="resnet"),
    ZooModel("resnext50_32x4d", family="resnext"),
    ZooModel("seresnext26d_32x4d", family="resnext"),
    ZooModel("vgg11", family="vgg"),
    ZooModel("densenet121", family="densenet"),
    ZooModel("dla34", family="dla"),
    ZooModel("efficientnet_b0", family="efficientnet"),
    ZooModel("efficientnet_lite0", family="efficientnet"),
    ZooModel("mobilenetv2_100", family="mobilenet v2"),
    ZooModel("mobilenetv3_small_050", family="mobilenet v3"),
    ZooModel("mobilenetv3_large_100", family="mobilenet v3"),
    ZooModel("mnasnet_100", family="mnasnet"),
    ZooModel("lcnet_050", family="lcnet"),
    ZooModel("regnetx_002", family="regnet"),
    ZooModel("regnety_002", family="regnet"),
    ZooModel("convnext_atto", family="convnext"),
    ZooModel("convnextv2_atto", family="convnext"),
    ZooModel("ghostnet_100", family="ghostnet"),
    ZooModel("rexnet_100", family="rexnet"),
    ZooModel("cspresnet50", family="cspnet"),
    ZooModel("poolformer_s12", family="metaformer"),
    ZooModel("vit_tiny_patch16_224", _VIT, family="vit"),
    ZooModel("deit_tiny_patch16_224", _VIT, family="deit"),
    ZooModel("mixer_s32_224", _VIT, family="mlp-mixer"),
    ZooModel("resmlp_12_224", {"img_size": 64}, family="resmlp"),
    ZooModel("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, family="swin"),
    ZooModel("levit_128s", {"img_size": 64}, family="levit"),
    ZooModel("efficientformer_l1", {"img_size": 64}, family="efficientformer"),
    # constructs that need the float64 check: relative-position bias tables, layer scales, window / grid
    # attention, attention whose layout differs from timm's standard one, LSTMs
    ZooModel("maxvit_tiny_tf_224", {"img_size": 64}, family="maxvit (rel-pos bias, window+grid attention)"),
    ZooModel("deit3_small_patch16_224", _VIT, family="deit3 (layer scale)"),
    ZooModel("cait_xxs24_224", _VIT, family="cait (layer scale, talking heads)"),
    ZooModel("nest_tiny", {"img_size": 64}, family="nest (block attention)"),
    ZooModel("sequencer2d_s", {"img_size": 64}, family="sequencer (LSTM)"),
    ZooModel("gcvit_xxtiny", {"img_size": 64}, family="gcvit (window attention, rel-pos bias)"),
    # ---- torchvision
    ZooModel("tv.resnet18", family="resnet"),
    ZooModel("tv.resnet50", family="resnet"),
    ZooModel("tv.resnext50_32x4d", family="resnext"),
    ZooModel("tv.wide_resnet50_2", family="resnet"),
    ZooModel("tv.vgg11_bn", family="vgg"),
    ZooModel("tv.alexnet", family="alexnet"),
    ZooModel("tv.densenet121", family="densenet"),
    ZooModel("tv.squeezenet1_1", family="squeezenet"),
    ZooModel("tv.googlenet", {"aux_logits": False, "init_weights": True}, family="inception"),
    ZooModel("tv.mobilenet_v2", family="mobilenet v2"),
    ZooModel("tv.mobilenet_v3_small", family="mobilenet v3"),
    ZooModel("tv.mnasnet0_5", family="mnasnet"),
    ZooModel("tv.shufflenet_v2_x0_5", family="shufflenet"),
    ZooModel("tv.efficientnet_b0", family="efficientnet"),
    ZooModel("tv.regnet_x_400mf", family="regnet"),
    ZooModel("tv.regnet_y_400mf", family="regnet"),
    ZooModel("tv.convnext_tiny", family="convnext"),
    ZooModel("tv.vit_b_32", {"image_size": 64}, family="vit"),
    ZooModel("tv.swin_t", family="swin"),
]

SMOKE = ["tv.mobilenet_v3_small", "tv.squeezenet1_1", "convnext_atto", "deit_tiny_patch16_224"]


@dataclass
class Row:
    """The sweep's result for one model."""

    name: str
    source: str
    family: str
    params: int = 0
    groups: int = 0
    coverage: float = 0.0
    preserved: bool | None = None  # None: not checked (no group, or the trace failed)
    check_error: float | None = None  # float64 relative output error of the independent check
    boundaries: int = 0
    notes: str = ""
    trace_s: float = 0.0
    error: str = ""


_BOUNDARY_RE = re.compile(r"\): (\d+) boundaries \(no permutation crosses them\): (.*)$", re.S)


def sweep_one(entry: ZooModel, *, rtol: float = RTOL) -> Row:
    """Build, trace and independently check one model."""
    row = Row(entry.name, entry.source, entry.family)
    try:
        model = entry.build().eval()
    except Exception as e:  # noqa: BLE001 - report, do not stop the sweep
        row.error = f"cannot build: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
        return row
    row.params = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = trace_spec(model, x)
    except Exception as e:  # noqa: BLE001
        row.trace_s = time.perf_counter() - start
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row.trace_s = time.perf_counter() - start
    for w in caught:
        match = _BOUNDARY_RE.search(str(w.message))
        if match:
            row.boundaries = int(match.group(1))
            row.notes = match.group(2)
    row.groups = len(spec)
    row.coverage = spec.coverage(model.state_dict())
    if len(spec):
        fresh = torch.randn(3, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(1))
        try:
            row.check_error = check_spec(model, spec, fresh, rtol=rtol, seed=12345)
            row.preserved = True
        except SpecCheckError as e:
            row.preserved, row.check_error = False, e.error
            row.error = str(e)[:200]
    return row


def run(entries: Iterable[ZooModel], *, log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    for entry in entries:
        row = sweep_one(entry)
        log(
            f"{row.name:32s} groups={row.groups:4d} coverage={row.coverage:6.1%} preserved={row.preserved} "
            f"error={row.check_error if row.check_error is not None else float('nan'):.1e} "
            f"boundaries={row.boundaries:3d} trace={row.trace_s:6.1f}s {row.error[:80]}"
        )
        rows.append(row)
    return rows


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    traced = [r for r in rows if not r.error or r.preserved is False]
    return {
        "models": len(rows),
        "timm": sum(r.source == "timm" for r in rows),
        "torchvision": sum(r.source == "torchvision" for r in rows),
        "failed": [r.name for r in rows if r.error and r.preserved is not False],
        "changed_function": [r.name for r in rows if r.preserved is False],
        "with_verified_group": sum(1 for r in rows if r.groups > 0 and r.preserved),
        "median_coverage": statistics.median([r.coverage for r in rows]) if rows else 0.0,
        "median_coverage_traced": statistics.median([r.coverage for r in traced]) if traced else 0.0,
        "median_trace_s": statistics.median([r.trace_s for r in traced]) if traced else 0.0,
        "max_check_error": max((r.check_error for r in rows if r.check_error is not None), default=0.0),
    }


def _short(notes: str, n: int = 3) -> str:
    parts = [p.strip() for p in notes.split(";") if p.strip()]
    kinds: dict[str, int] = {}
    for p in parts:
        why = p[p.find("(") + 1 : p.rfind(")")] if "(" in p else p
        why = re.sub(r"\(.*", "", re.sub(r"\d+", "N", why)).strip()[:60]
        kinds[why] = kinds.get(why, 0) + 1
    return "; ".join(f"{k} x{v}" if v > 1 else k for k, v in list(kinds.items())[:n])


def markdown(rows: Sequence[Row], *, command: str) -> str:
    s = summary(rows)
    lines = [
        "# Automatic permutation specs: zoo coverage",
        "",
        "`trace_spec` on randomly initialised timm and torchvision classifiers (no pretrained weights), "
        "input 2x3x64x64, CPU. *Groups*: permutation groups found. *Coverage*: fraction of parameter and "
        "buffer elements that lie on a permuted axis (`spec.coverage`). *Preserved*: an independent "
        "`check_spec` with a fresh seed and a fresh input (every group permuted at once, eval mode, "
        "constant or tiny parameters such as biases, layer scales, bias tables and BatchNorm statistics randomised) "
        "keeps the outputs within 1e-9 relative error in float64 (on a float64 CPU copy; round-off is ~1e-15 to "
        "1e-13, a real change at least ~1e-7); the error is given in brackets. *Boundaries*: nodes "
        "no permutation crosses (the most common reasons are listed; the model's input and output are "
        "always fixed and not counted). *Trace*: wall time of `trace_spec` including its own check, on a "
        "shared 2-core machine (indicative only).",
        "",
        f"Produced by `{command}`.",
        "",
        f"Summary: {s['models']} models ({s['timm']} timm, {s['torchvision']} torchvision); "
        f"{s['with_verified_group']} ({s['with_verified_group'] / max(s['models'], 1):.0%}) with at least one "
        f"verified group; models whose spec changes the function: {len(s['changed_function'])}; "
        f"median coverage {s['median_coverage']:.1%}; largest float64 check error {s['max_check_error']:.1e}; "
        f"failures: {', '.join(s['failed']) or 'none'}.",
        "",
        "| model | source | family | params | groups | coverage | preserved | boundaries | trace (s) | notes |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        err = f" ({r.check_error:.0e})" if r.check_error is not None else ""
        preserved = {True: f"yes{err}", False: f"**NO**{err}", None: "-"}[r.preserved]
        notes = r.error if r.error else _short(r.notes)
        lines.append(
            f"| {r.name} | {r.source} | {r.family} | {f'{r.params / 1e6:.1f}M' if r.params else '-'} | {r.groups} | {r.coverage:.1%} | "
            f"{preserved} | {r.boundaries} | {r.trace_s:.1f} | {notes.replace('|', '/')} |"
        )
    lines += ["", *_LIMITS]
    return "\n".join(lines) + "\n"


_LIMITS = [
    "## What becomes a boundary, and why",
    "",
    "- **Grouped convolutions and GroupNorm** (ResNeXt, RegNet, GroupNorm ResNets) are understood: a block group "
    "moves whole groups of channels (the same on both sides of the convolution), and inside each group the "
    "output channels have a permutation of their own while the input channels share one (the weight's input "
    "axis is per position). Depthwise convolutions share their input's permutation. A grouped transposed "
    "convolution, or a grouped layer whose channels are concatenated with others, is a boundary (or its block "
    "group is dropped by the check).",
    "- **Flatten of a spatial map into a Linear** (VGG, AlexNet classifiers): the Linear's input axis is C*H*W; "
    "a permutation of C would act on it as a block permutation, which the spec format cannot express, so the "
    "last conv's channels are fixed (the classifier's hidden units are still permuted).",
    "- **Reshapes that split or merge a channel dim** (channel shuffle, the window / block attention of gcvit, "
    "NesT and MaxViT, GLU-style chunks inside one projection, ghost modules that slice a concatenation): fixed. "
    "Merging positions into an innermost channel dim (Swin's `PatchMerging`: 4 tokens concatenated) is followed: "
    "the copies share one permutation.",
    "- **Attention**: timm's standard `Attention` (recognised by its forward and the attributes its layout reads, "
    "not by its class name) and `nn.MultiheadAttention` are understood as units: a block group permutes whole "
    "heads (q, k, v, their biases, `proj`'s input), composed with per-head query/key and value permutations, and "
    "the residual stream goes through qkv / proj; with an attention mask (which may differ per head) or per-head "
    "attention weights returned, heads stay in place. Grouped-query attention is only written op by op, where "
    "the per-head reshapes are boundaries (never a wrong permutation). Swin's window attention (timm's "
    "`WindowAttention`, torchvision's `shifted_window_attention`, v1) is a unit too: heads move with their column "
    "of the relative position bias table (the shifted-window mask is shared by all heads); window partition / "
    "reverse, `torch.roll` and padding of positions keep the channels (torchvision's Swin v2, with a per-head "
    "logit scale and a bias MLP, stays a boundary). Other attention variants (LeViT, NesT, MaxViT, gcvit) are "
    "traced op by op; their qkv / proj inner axes become boundaries, the "
    "residual stream stays permuted when the model's reshapes allow it. An attention mask or bias passed to "
    "`scaled_dot_product_attention` is tied to the heads of q / k / v like a broadcast `+`.",
    "- **Untraceable submodules** (data-dependent control flow) become leaves and boundaries; a model whose own "
    "forward cannot be traced raises `UntraceableModelError` naming the line, and needs a hand-written spec.",
    "- The model's input and output axes are always fixed.",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--only", nargs="*", help="model names (timm names, tv.<name> for torchvision)")
    parser.add_argument("--smoke", action="store_true", help="only the CI smoke subset")
    args = parser.parse_args(argv)
    names = SMOKE if args.smoke else args.only
    entries = [m for m in MODELS if names is None or m.name in names]
    unknown = set(names or ()) - {m.name for m in entries}
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    rows = run(entries)
    command = "python -m integrations.zoo.sweep" + (f" --out {args.out}" if args.out else "")
    if names:
        command += " --only " + " ".join(names)
    text = markdown(rows, command=command)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text.split("\n\n")[3])
    s = summary(rows)
    return 1 if s["changed_function"] else 0


if __name__ == "__main__":
    sys.exit(main())
