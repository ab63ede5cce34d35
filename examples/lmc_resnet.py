"""Linear mode connectivity of two ResNet18s on MNIST (32x32), with BatchNorm statistics reset.

Two torchvision ResNet18s are trained from different seeds on MNIST resized to 32x32. Interpolating
networks with BatchNorm collapses the variance of their activations, so at every point of the segment the
BatchNorm running statistics are recomputed on training batches (``reset_bn=True``; ``repair=True`` would
apply REPAIR instead). Curves: as trained (naive), Sinkhorn re-basin of A into B's basin, weight matching.

    python examples/lmc_resnet.py            # a few minutes on 2 CPU cores (a GPU is used when present)
    python examples/lmc_resnet.py --smoke    # seconds

Picture in --out (default outputs/lmc_resnet): lmc.png (loss and accuracy along the segment A -> B).
"""

import torch
from common import accuracy, lmc_comparison, mnist_loaders, parse_args, resnet18, train

args = parse_args("lmc_resnet", __doc__.splitlines()[0])
train_size, epochs = (128, 1) if args.smoke else (2000, 2)
train_loader, test_loader = mnist_loaders(args, flatten=False, train_size=train_size, size=32, channels=3)

models = []
for seed in (args.seed, args.seed + 1):
    torch.manual_seed(seed)
    print(f"training a ResNet18 from seed {seed} on {len(train_loader.dataset)} images")
    models.append(train(resnet18(), train_loader, epochs, device=args.device, label=f"seed {seed}"))
model_a, model_b = models
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# BatchNorm statistics are recomputed at every point (5 training batches) before it is evaluated
lmc_comparison(model_a, model_b, test_loader, args.out, "MNIST ResNet18 (BN reset): A -> B", args.smoke,
               reset_bn=True, bn_data=train_loader, n_batches=5)  # fmt: skip
