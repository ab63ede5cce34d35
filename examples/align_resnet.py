"""Align a torchvision ResNet18 to a permuted copy of itself: residual streams and BatchNorm statistics.

Model A is torchvision's ResNet18 (random initialisation, then a short training on MNIST resized to 32x32 so
that its BatchNorm running statistics are real). Model B is A with every permutable channel shuffled by a
planted permutation plus a little noise. In a ResNet the channels of each residual stream must be permuted
together (every block adds into them) and BatchNorm's running mean / variance move with their channels:
the traced spec knows this. Sinkhorn re-basin (data-free L2 cost, started at the identity) recovers the
permutation; the GIF shows ``layer1.0.conv2``'s weight under the learnt soft permutation.

    python examples/align_resnet.py            # a few minutes on 2 CPU cores
    python examples/align_resnet.py --smoke    # seconds

Pictures in --out (default outputs/align_resnet): resnet_model_a.png, resnet_rebasin.gif, resnet_model_b.png.
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
    resnet18,
    train,
)  # fmt: skip

from rebasin_callbacks import permute, trace_spec

args = parse_args("align_resnet", __doc__.splitlines()[0])
train_size, steps = (128, 4) if args.smoke else (1000, 150)
train_loader, test_loader = mnist_loaders(args, flatten=False, train_size=train_size, size=32, channels=3)

# 1. model A: ResNet18, briefly trained (one pass over a subset) so its BatchNorm statistics are real
print("training model A (torchvision resnet18, 32x32 inputs)")
model_a = train(resnet18(), train_loader, 1, device=args.device, label="A")

# 2. the spec: one group per residual stream and one inside each block, BatchNorm buffers included
spec = trace_spec(model_a, torch.zeros(2, 3, 32, 32, device=args.device))
print(f"  spec: {len(spec)} groups, {spec.coverage(model_a.state_dict()):.0%} of the weights permuted")

# 3. model B: a planted permutation of A plus noise (2% of each tensor's std)
model_b = planted(model_a, spec, noise=0.02, seed=args.seed + 1)
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# 4. Sinkhorn re-basin from the identity, recording a convolution inside the first residual block
key = "layer1.0.conv2.weight"
# (a larger learning rate than for the MLP: the ResNet's nearly untrained units give a weaker L2 signal)
perms, frames, costs = rebasin_with_frames(model_a, model_b, spec, key, steps=steps, lr=1.0)
rebased = permute(model_a, spec, perms)  # permutes BatchNorm running statistics too

# 5. check (eval mode, so BatchNorm uses its permuted running statistics): same function as A, next to B
report_alignment(model_a, model_b, rebased.eval(), next(iter(test_loader))[0][:32].to(args.device), perms)
alignment_pictures(model_a, model_b, rebased, frames, key, args.out, "resnet")
