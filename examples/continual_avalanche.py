"""Continual learning on Rotated MNIST with Avalanche: re-basin incremental learning vs plain fine-tuning.

Experiences: MNIST rotated counter-clockwise by 0, 45 and 90 degrees, inputs normalised as Avalanche's
``RotatedMNIST`` does (mean 0.1307, std 0.3081). The naive strategy fine-tunes one MLP on each in turn
and forgets the earlier rotations. Re-basin incremental learning (Procedure 1 of the supplement of Peña
et al.) trains the first experience normally and, for every later one, learns a permutation of the
previous weights plus a residual, then fuses them. It runs here as :class:`~rebasin_callbacks.avalanche.
ReBasinPlugin` inside Avalanche's own ``Naive`` strategy, with the settings that reproduce the paper's
Rotated MNIST row (``benchmarks/incremental.py``: 0.802 accuracy, 0.117 forgetting over 20 rotations of the
full MNIST, 3 seeds; BENCHMARKS.md): the authors' released settings without
their residual gradient clamp (``released_settings(delta_grad_clip=None)``), a fixed 50 samples per past
experience (``released_replay``), AdamW, and the supplement's batch 500 x 5 epochs (``PAPER_SETTINGS``).
After each experience the accuracy on every rotation's test set is measured; the re-basin quantities of
each experience are printed.

    python examples/continual_avalanche.py            # a few minutes on 2 CPU cores
    python examples/continual_avalanche.py --smoke    # seconds

Picture in --out (default outputs/continual_avalanche): accuracy.png (mean accuracy over the rotations
seen so far, and accuracy per rotation at the end).
"""

import warnings

import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.training import Naive
from common import accuracy, mlp, parse_args
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from rebasin_callbacks.avalanche import PAPER_SETTINGS, ReBasinPlugin, released_replay, released_settings
from rebasin_callbacks.data import mnist, rotated

warnings.filterwarnings("ignore")  # Avalanche's deprecation notes
args = parse_args("continual_avalanche", __doc__.splitlines()[0])
angles, width, n = ([0, 90], 32, 512) if args.smoke else ([0, 45, 90], 256, 4000)
budget = dict(PAPER_SETTINGS, train_epochs=1) if args.smoke else PAPER_SETTINGS  # batch 500, 5 epochs


def normalised(ds):
    x, y = ds.tensors
    return (x - 0.1307) / 0.3081, y


train_set = mnist(train=True, flatten=True, download=args.download, seed=args.seed)
test_set = mnist(train=False, flatten=True, download=args.download, seed=args.seed)
tasks_train = [normalised(rotated(train_set, a)) for a in angles]
tasks_test = [normalised(rotated(test_set, a)) for a in angles]
bench = tensors_benchmark([(x[:n], y[:n]) for x, y in tasks_train], tasks_test, task_labels=[0] * len(angles))


def run(make_strategy, label):
    """Train on the experiences in order; accuracy on every rotation after each experience."""
    torch.manual_seed(args.seed)
    model = mlp(width)
    strategy = make_strategy(model)
    rows = []
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
        rows.append(
            [accuracy(model, DataLoader(list(zip(x, y)), batch_size=500), args.device) for x, y in tasks_test]
        )
        print(f"  {label} after {angles[len(rows) - 1]} deg: " + ", ".join(f"{a:.3f}" for a in rows[-1]))
    return rows


def naive(model, plugins=()):
    return Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), 1e-3),
        plugins=list(plugins),
        criterion=torch.nn.CrossEntropyLoss(),
        device=args.device,
        evaluator=None,
        **budget,
    )


rebasin = ReBasinPlugin(example_inputs=torch.zeros(2, 784), **released_settings(delta_grad_clip=None))
results = {
    "naive fine-tuning": run(naive, "naive"),
    "re-basin incremental": run(lambda m: naive(m, [rebasin, released_replay(len(angles))]), "re-basin"),
}  # fmt: skip
for h in rebasin.history:
    print(f"  re-basin experience {h['experience']:.0f}: {h['units_moved']:.0f} hidden units moved, "
          f"residual norm {h['delta_norm']:.3f}, mean cost {h['cost']:.3f}")  # fmt: skip

# picture: mean accuracy over the rotations seen so far, and the final accuracy per rotation
fig = Figure(figsize=(9, 3.6), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
for i, (label, rows) in enumerate(results.items()):
    seen = [sum(r[: e + 1]) / (e + 1) for e, r in enumerate(rows)]
    ax1.plot(angles, seen, marker="o", label=label, linestyle="--" if i == 0 else "-")
    ax2.bar([j + 0.4 * i for j in range(len(angles))], rows[-1], width=0.4, label=label)
ax1.set(xlabel="trained up to rotation (deg)", ylabel="mean accuracy on rotations seen", xticks=angles)
ax2.set(xlabel="rotation (deg)", ylabel="accuracy after the last experience", ylim=(0, 1))
ax2.set_xticks([j + 0.2 for j in range(len(angles))], [str(a) for a in angles])
for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
fig.suptitle(f"Rotated MNIST, MLP 784-{width}-{width}-10")
fig.savefig(args.out / "accuracy.png", dpi=80)
print(f"  plot: {args.out / 'accuracy.png'}")
