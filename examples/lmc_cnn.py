"""Linear mode connectivity of two independently trained VGG-style CNNs (no BatchNorm) on MNIST.

The same comparison as ``lmc_mlp.py`` with convolutions: two CNNs trained from different seeds,
interpolated as trained (naive), after Sinkhorn re-basin of A into B's basin (L2 cost and midpoint loss),
and after weight matching.
Without BatchNorm nothing needs to be recomputed along the segment.

    python examples/lmc_cnn.py            # a few minutes on 2 CPU cores
    python examples/lmc_cnn.py --smoke    # seconds

Picture in --out (default outputs/lmc_cnn): lmc.png (loss and accuracy along the segment A -> B).
"""

import torch
from common import accuracy, lmc_comparison, mnist_loaders, parse_args, train, vgg_cnn

args = parse_args("lmc_cnn", __doc__.splitlines()[0])
width, epochs = (8, 1) if args.smoke else (32, 2)
train_loader, test_loader = mnist_loaders(args, flatten=False)

models = []
for seed in (args.seed, args.seed + 1):
    torch.manual_seed(seed)
    print(f"training a VGG-style CNN (width {width}) from seed {seed}")
    models.append(train(vgg_cnn(width), train_loader, epochs, device=args.device, label=f"seed {seed}"))
model_a, model_b = models
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# re-based twice: data-free L2 cost, and the loss at the midpoint of the segment (Mid, on training batches)
lmc_comparison(model_a, model_b, test_loader, args.out, f"MNIST VGG-style CNN (width {width}): A -> B", args.smoke,
               costs=("l2", "mid"), train_loader=train_loader)  # fmt: skip
