"""Linear mode connectivity of two independently trained MNIST MLPs: naive, re-based, weight matching.

Two copies of the paper's MLP (784-512-512-10) are trained from different seeds. Interpolating their
weights directly (naive) passes through a region of high loss: the loss barrier. Permuting model A's hidden
units into B's basin first (Sinkhorn re-basin, :func:`rebasin_callbacks.align`) removes most of it; two
re-based curves: the data-free L2 cost and the loss at the midpoint of the segment ("mid"). Weight matching
(Git Re-Basin) is shown for comparison. No permutation changes what A computes, only where it sits in
weight space.

    python examples/lmc_mlp.py            # about a minute on 2 CPU cores
    python examples/lmc_mlp.py --smoke    # seconds

Picture in --out (default outputs/lmc_mlp): lmc.png (loss and accuracy along the segment A -> B).
"""

import torch
from common import accuracy, lmc_comparison, mlp, mnist_loaders, parse_args, train

args = parse_args("lmc_mlp", __doc__.splitlines()[0])
width, epochs = (32, 1) if args.smoke else (512, 5)
train_loader, test_loader = mnist_loaders(args, flatten=True)

# two models, same architecture and data, different initialisation and data order
models = []
for seed in (args.seed, args.seed + 1):
    torch.manual_seed(seed)
    print(f"training an MLP 784-{width}-{width}-10 from seed {seed}")
    models.append(train(mlp(width), train_loader, epochs, device=args.device, label=f"seed {seed}"))
model_a, model_b = models
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# loss / accuracy on the segment from A to B: as trained, re-based, weight matching
# re-based twice: data-free L2 cost, and the loss at the midpoint of the segment (Mid, on training batches)
lmc_comparison(model_a, model_b, test_loader, args.out, f"MNIST MLP {width}x2: A -> B", args.smoke,
               costs=("l2", "mid"), train_loader=train_loader)  # fmt: skip
