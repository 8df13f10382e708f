"""Train an MLP on scikit-learn's bundled digits with SGD, Adam, and kfe's rules.

Real data, no download. Prints the full-training-set loss every 50 steps per optimizer.

    python examples/train_digits.py --steps 300
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import nn

import kfe

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd (torch)": lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9),
    "adam (torch)": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "sgd-in-kfe": lambda m: kfe.KFEOptimizer(m, rule="sgd", lr=0.3, momentum=0.9),
    "kfac": lambda m: kfe.KFEOptimizer(m, rule="kfac", lr=0.1, damping=0.1),
    "ekfac": lambda m: kfe.KFEOptimizer(
        m, rule="ekfac", lr=0.1, damping=1e-2, factor_every=1, basis_every=10, lambda_every=1
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    print(f"digits: {len(X)} examples, 64 features, 10 classes; {args.steps} steps")
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        opt = make(model)
        g = torch.Generator().manual_seed(args.seed)
        start, trace = time.perf_counter(), []
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(X), (args.batch,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            if step % 50 == 0:
                with torch.no_grad():
                    trace.append(nn.functional.cross_entropy(model(X), y).item())
        elapsed = time.perf_counter() - start
        losses = " ".join(f"{v:.4f}" for v in trace)
        print(f"{name:>13}: train loss every 50 steps: {losses}  ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
