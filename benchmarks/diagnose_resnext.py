"""Why does re-basin leave a high barrier between the ResNeXt-style pairs of ``quality_vit.py``?

For each cached pair (``quality_vit.py --family resnext`` trains them): the test accuracy of both endpoints;
the L2 distance before and after weight matching with the traced spec (block groups: whole GroupNorm /
grouped-convolution groups move) and with the block groups dropped (groups kept in place), with the loss
barrier of each; and a planted check on the trained model itself (model A permuted at random, weight-matched
back: the L2 distance left should be 0).

Usage::

    REBASIN_DATA=/path/to/torchvision/data python benchmarks/diagnose_resnext.py --pairs 0 1 2 --epochs 1
"""

from __future__ import annotations

import argparse
import warnings

import quality_vit as q
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import lmc_curve
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.trace import _drop_groups, trace_spec
from rebasin_callbacks.utils import l2_distance


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    q.FAMILY = "resnext"
    torch.set_num_threads(1)
    data, loader = mnist(train=True), DataLoader(mnist(train=False), batch_size=1000)
    x = next(iter(loader))[0][:2]
    for pair in args.pairs:
        a, b = q.trained(2 * pair, data, args.epochs), q.trained(2 * pair + 1, data, args.epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = trace_spec(b, x)
        specs = {"groups": spec, "in place": _drop_groups(spec, spec.block_groups, b.state_dict())}
        print(f"pair {pair}: accuracy A {accuracy(a, loader):.4f} B {accuracy(b, loader):.4f}")
        print(f"  naive: L2 {l2_distance(b, a):.3f}")
        for name, s in specs.items():
            rebased = permute(b, s, weight_matching(b, a, s, seed=pair))
            barrier = lmc_curve(a, rebased, (loader, F.cross_entropy), n_points=5, progress=False)
            print(f"  wm {name}: L2 {l2_distance(rebased, a):.3f} barrier {barrier.barriers['loss']:.3f}")
        for name, s in specs.items():
            planted = permute(a, s, random_permutations(s, 11 + pair))
            back = permute(planted, s, weight_matching(planted, a, s, seed=pair))
            print(f"  planted {name}: L2 {l2_distance(planted, a):.3f} -> {l2_distance(back, a):.2e}")


if __name__ == "__main__":
    main()
