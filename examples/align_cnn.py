"""Align a VGG-style CNN (no BatchNorm) to a permuted copy of itself: re-basin on convolution channels.

Model A is a small VGG-style CNN (four 3x3 convolutions, two linears, no BatchNorm) trained on MNIST;
model B is A with every hidden channel shuffled by a planted permutation plus a little noise. Sinkhorn
re-basin (data-free L2 cost, started at the identity) recovers the permutation; the GIF shows the second
convolution's weight (rows: output channels, columns: input channel x 3x3 kernel, first 48 of each)
under the learnt soft permutation.

    python examples/align_cnn.py            # a few minutes on 2 CPU cores
    python examples/align_cnn.py --smoke    # seconds

Pictures in --out (default outputs/align_cnn): cnn_model_a.png, cnn_rebasin.gif, cnn_model_b.png.
"""

import torch
from common import (
    accuracy,
    alignment_pictures,
    mnist_loaders,
    parse_args,
    planted,
    rebasin_with_frames,
    report_alignment,
    train,
    vgg_cnn,
)  # fmt: skip

from rebasin_callbacks import permute, trace_spec

args = parse_args("align_cnn", __doc__.splitlines()[0])
width, epochs, steps = (8, 1, 30) if args.smoke else (32, 1, 300)
train_loader, test_loader = mnist_loaders(args, flatten=False)

# 1. model A: trained on MNIST
print(f"training model A (VGG-style CNN, width {width})")
model_a = train(vgg_cnn(width), train_loader, epochs, device=args.device, label="A")

# 2. the permutation spec, traced from the computation graph: one group per hidden conv / linear layer
spec = trace_spec(model_a, torch.zeros(2, 1, 28, 28, device=args.device))
print(f"  spec: {len(spec)} groups {spec.groups}")

# 3. model B: a planted permutation of A plus noise (5% of each tensor's std)
model_b = planted(model_a, spec, noise=0.05, seed=args.seed + 1)
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# 4. Sinkhorn re-basin from the identity, recording the permuted second convolution
key = "2.weight"
perms, frames, costs = rebasin_with_frames(model_a, model_b, spec, key, steps=steps)
rebased = permute(model_a, spec, perms)

# 5. check: same function as A, next to B
report_alignment(model_a, model_b, rebased, next(iter(test_loader))[0][:64].to(args.device), perms)
alignment_pictures(model_a, model_b, rebased, frames, key, args.out, "cnn")
