"""Train the built-in demo nets on scikit-learn's digits and write the weights `demo:` specs start from.

    .venv/bin/python scripts/train_demos.py [--epochs 30] [--out estimators/weights]

Deterministic (seed 0, one thread for the data order): the shipped weights are this script's output.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from estimators.data import load_data  # noqa: E402
from estimators.demos import DEMOS  # noqa: E402
from tasks.train import TrainConfig, accuracy, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "estimators" / "weights"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (factory, _) in DEMOS.items():
        torch.manual_seed(0)
        model = factory()
        data = load_data("digits")
        t0 = time.perf_counter()
        train(model, data.train, None, TrainConfig(epochs=args.epochs, lr=args.lr), label=name,
              progress=lambda m: print(m, flush=True) if f"epoch {args.epochs}/" in m or "epoch 1/" in m else None)
        acc = accuracy(model, data.val)
        path = out / f"{name}.pt"
        torch.save(model.state_dict(), path)
        print(f"{name}: validation accuracy {acc:.2f}% after {args.epochs} epochs in {time.perf_counter() - t0:.1f} s "
              f"-> {path} ({path.stat().st_size // 1024} KiB)", flush=True)


if __name__ == "__main__":
    main()
