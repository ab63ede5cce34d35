"""Align an MNIST MLP to a permuted copy of itself and watch Sinkhorn re-basin undo the permutation.

Model A is the paper's MLP (784-512-512-10) trained on MNIST. Model B is A with its hidden units shuffled by
a random (planted) permutation plus a little noise: it computes almost the same function, but its weight
matrices look unrelated to A's. Re-basin learns the permutation back from the weights alone (data-free L2
cost); the GIF shows A's second-layer weight (top-left 48x48 block) under the learnt soft permutation,
step by step, turning into B's.

    python examples/align_mlp.py            # about a minute on 2 CPU cores
    python examples/align_mlp.py --smoke    # seconds

Pictures in --out (default outputs/align_mlp): mlp_model_a.png, mlp_rebasin.gif, mlp_model_b.png.
"""

import torch
from common import (
    accuracy,
    alignment_pictures,
    mlp,
    mnist_loaders,
    parse_args,
    planted,
    rebasin_with_frames,
    report_alignment,
    train,
)

from rebasin_callbacks import permute, trace_spec

args = parse_args("align_mlp", __doc__.splitlines()[0])
width, epochs, steps = (32, 1, 30) if args.smoke else (512, 3, 300)
train_loader, test_loader = mnist_loaders(args, flatten=True)

# 1. model A: trained on MNIST
print(f"training model A (MLP 784-{width}-{width}-10)")
model_a = train(mlp(width), train_loader, epochs, device=args.device, label="A")

# 2. the permutation spec: which weight axes each hidden layer's permutation acts on (traced from the graph)
spec = trace_spec(model_a, torch.zeros(2, 784, device=args.device))
print(f"  spec: {len(spec)} groups {spec.groups}")

# 3. model B: a planted permutation of A plus noise (5% of each tensor's std)
model_b = planted(model_a, spec, noise=0.05, seed=args.seed + 1)
print(
    f"  accuracy: A {accuracy(model_a, test_loader, args.device):.3f}, B {accuracy(model_b, test_loader, args.device):.3f}"
)

# 4. Sinkhorn re-basin from the identity, recording the permuted layer-2 weight at every other step
key = "2.weight"
perms, frames, costs = rebasin_with_frames(model_a, model_b, spec, key, steps=steps)
rebased = permute(model_a, spec, perms)  # exact hard permutation: same function as A

# 5. check: the re-based A computes what A computes and now sits on top of B
report_alignment(model_a, model_b, rebased, next(iter(test_loader))[0][:64].to(args.device), perms)

alignment_pictures(model_a, model_b, rebased, frames, key, args.out, "mlp")
