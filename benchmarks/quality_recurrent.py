"""Does aligning hidden units lower the barrier between two independently trained recurrent classifiers?

Pairs of small LSTM classifiers (the 28 rows of an MNIST image as a sequence of 28 steps -> ``nn.LSTM(28,
64)`` -> ``nn.Linear(64, 10)`` on the last step) are trained from different seeds on full MNIST, and the
second of each pair is permuted into the first one's basin by

* ``naive``: nothing (the straight line between the two as trained);
* ``wm``: weight matching with the traced spec (one permutation of the 64 hidden units, acting alike on
  the four gate blocks of ``weight_ih`` / ``weight_hh`` and both biases, on ``weight_hh``'s columns and on
  the classifier's input);
* ``align``: :func:`rebasin_callbacks.align`, data-free (L2 cost, weight matching as its warm start);
* ``align mid``: ``align(cost="mid")`` (the loss at the midpoint on training batches; ``--mid``).

Reported per pair and method: the loss barrier on the test split along the straight line (5 points), the
L2 distance of the weights to the reference (what the data-free methods minimise), and wall time.
Trained models are cached under ``.data/recurrent/`` so a second run only measures. ``--smoke`` runs one
tiny pair on a few hundred images, uncached (a check that the script works, not a measurement).

Usage::

    REBASIN_DATA=/path/to/torchvision/data python benchmarks/quality_recurrent.py --seeds 3 --epochs 1 --mid
    python benchmarks/quality_recurrent.py --smoke
    python benchmarks/quality_recurrent.py --coverage   # timm sequencer2d_s: groups, coverage, LSTM units
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from rebasin_callbacks.align import align
from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import lmc_curve
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute
from rebasin_callbacks.trace import trace_spec
from rebasin_callbacks.utils import l2_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import train_classifier  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".data" / "recurrent"
METHODS = ("naive", "wm", "align")
MID = ("align mid",)


class RowLSTM(nn.Module):
    """An image's rows as a sequence -> LSTM -> Linear on the last step's output.

    Example:
        >>> RowLSTM(hidden=8)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.flatten(0, 1))  # (B, 1, 28, 28) -> 28 steps of 28 pixels
        return self.fc(out[:, -1])


def trained(seed: int, data, epochs: int, hidden: int, cache: bool) -> nn.Module:
    """The model of ``seed``, from the cache when it is there."""
    path = CACHE / f"lstm{hidden}_s{seed}_e{epochs}.pt"
    if cache and path.exists():
        model = RowLSTM(hidden)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    model = train_classifier(
        lambda: RowLSTM(hidden), seed, data, epochs, lambda p: torch.optim.Adam(p, lr=2e-3)
    )
    if cache:
        from rebasin_callbacks.io import atomic_torch_save

        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(model.state_dict(), path)
    print(f"trained seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def rebase(method: str, model: nn.Module, reference: nn.Module, spec, loader: DataLoader, seed: int):
    """``model`` permuted into ``reference``'s basin by ``method``."""
    if method == "naive":
        return model
    if method == "wm":
        return permute(model, spec, weight_matching(model, reference, spec, seed=seed))
    kwargs: dict = {"spec": spec, "seed": seed, "progress": False}
    if method == "align mid":
        kwargs.update(cost="mid", data=loader, loss_fn=F.cross_entropy)
    return align(model, reference, **kwargs).model


def evaluate_pair(pair: int, a: nn.Module, b: nn.Module, train_loader, test_loader, methods) -> list[dict]:
    example = next(iter(test_loader))[0][:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = trace_spec(b, example)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        rebased = rebase(method, b, a, spec, train_loader, pair)
        seconds = time.perf_counter() - t0
        curve = lmc_curve(
            a, rebased, (test_loader, F.cross_entropy), n_points=5, progress=False, label=method
        )
        barrier, l2 = curve.barriers["loss"], l2_distance(rebased, a)
        rows.append({"pair": pair, "method": method, "loss_barrier": barrier, "l2": l2, "seconds": seconds})
        print(
            f"pair {pair} {method:10s} loss barrier {barrier:.4f}  L2 {l2:.3f}  {seconds:.2f} s", flush=True
        )
    return rows


def markdown(rows: list[dict], methods, command: str) -> str:
    pairs = sorted({r["pair"] for r in rows})
    naive = {r["pair"]: r["loss_barrier"] for r in rows if r["method"] == "naive"}
    head = "| method | " + " | ".join(f"pair {p} barrier" for p in pairs)
    head += " | median barrier | median ratio to naive | median L2 to the reference | median time |"
    lines = [f"Command: `{command}` (CPU, 2 cores, shared)", "", head, "|" + "---|" * (len(pairs) + 5)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = " | ".join(f"{r['loss_barrier']:.3f}" for r in rs)
        med_b = statistics.median(r["loss_barrier"] for r in rs)
        ratios = [r["loss_barrier"] / naive[r["pair"]] for r in rs if naive.get(r["pair"], 0) > 0]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "n/a"
        med_t = statistics.median(r["seconds"] for r in rs)
        med_l2 = statistics.median(r["l2"] for r in rs)
        lines.append(f"| {m} | {cells} | {med_b:.3f} | {ratio} | {med_l2:.2f} | {med_t:.2f} s |")
    return "\n".join(lines)


def sequencer_coverage(name: str = "sequencer2d_s", size: int = 64) -> dict:
    """``trace_spec`` on a randomly initialised timm model with LSTMs: coverage and LSTM hidden units moved,
    then an independent float64 ``check_spec`` (fresh seed and input)."""
    import timm

    from rebasin_callbacks.trace import check_spec

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = trace_spec(model, x)
    seconds = time.perf_counter() - t0
    lstms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    units = moved = 0
    for n, m in lstms:
        for k in range(m.num_layers):
            for d in ("", "_reverse") if m.bidirectional else ("",):
                units += m.hidden_size
                moved += m.hidden_size * (
                    spec.axes_to_perm.get(f"{n}.weight_hh_l{k}{d}", (None,))[0] is not None
                )
    generator = torch.Generator().manual_seed(5)
    error = (
        check_spec(model, spec, torch.randn(2, 3, size, size, generator=generator), seed=123)
        if len(spec)
        else 0.0
    )
    row = {
        "model": name, "groups": len(spec), "coverage": spec.coverage(model.state_dict()), "lstms": len(lstms),
        "hidden_units": units, "hidden_units_moved": moved, "check_error": error, "trace_seconds": seconds,
    }  # fmt: skip
    print(
        f"{name} at 2x3x{size}x{size}: {row['groups']} groups, coverage {row['coverage']:.1%}, LSTM hidden units "
        f"permuted {moved}/{units} in {len(lstms)} LSTMs, independent float64 check {error:.1e}, "
        f"trace_spec {seconds:.1f} s"
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="pairs: seeds (0, 1), (2, 3), ...")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--mid", action="store_true", help='also align(cost="mid")')
    p.add_argument("--smoke", action="store_true", help="one tiny pair on a few hundred images, uncached")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument(
        "--coverage", action="store_true", help="only trace timm sequencer2d_s and report coverage"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.coverage:
        return [sequencer_coverage()]
    data, test = mnist(train=True), mnist(train=False)
    if args.smoke:
        args.seeds, args.hidden = 1, 8
        data, test = Subset(data, range(256)), Subset(test, range(128))
    models = [trained(s, data, args.epochs, args.hidden, cache=not args.smoke) for s in range(2 * args.seeds)]
    if args.train_only:
        return []
    test_loader = DataLoader(test, batch_size=1000)
    train_loader = DataLoader(data, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))
    methods = list(METHODS) + (list(MID) if args.mid else [])
    rows: list[dict] = []
    for pair in range(args.seeds):
        rows += evaluate_pair(
            pair, models[2 * pair], models[2 * pair + 1], train_loader, test_loader, methods
        )
    table = markdown(
        rows,
        methods,
        "python benchmarks/quality_recurrent.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(table)
    if args.out is not None:
        from rebasin_callbacks.io import atomic_write_text

        atomic_write_text(args.out, table + "\n")
    return rows


if __name__ == "__main__":
    main()
