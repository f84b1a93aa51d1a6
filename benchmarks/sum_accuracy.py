"""Which float32 the whole-model sum lands on, over several random draws of the models.

A float32 result can only be as close to the exact sum as the float32 nearest to it. This
prints, for each draw (the seed of `bench.build_model`), how far the sums of modtensor and of
the concatenation are from the float64 sum of all parameters, and whether each is that nearest
float32:

    python benchmarks/sum_accuracy.py                      # GPT-2 and ResNet-50, seeds 0-5
    python benchmarks/sum_accuracy.py --models gpt2 --seeds 20
"""

import argparse

import torch
from bench import MODELS, build_model

import modtensor as mt


def relative_error(value: float, exact: float) -> float:
    return abs(value - exact) / abs(exact)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,resnet50", help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--seeds", type=int, default=6, help="draws per model (seeds 0..N-1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("model     seed  exact sum            cat rel. err  nearest  modtensor rel. err  nearest  "
          "at least as close")
    for model in args.models.split(","):
        for seed in range(args.seeds):
            params = [p.detach() for p in build_model(model, "cpu", seed).parameters()]
            exact = float(torch.cat([p.reshape(-1).double() for p in params]).sum())
            nearest = float(torch.tensor(exact, dtype=torch.float64).float())
            cat = float(torch.cat([p.reshape(-1) for p in params]).sum())
            with torch.no_grad():
                got = float(mt.bundle(params).sum())
            cat_err, got_err = relative_error(cat, exact), relative_error(got, exact)
            print(f"{model:<9} {seed:>4}  {exact:<19.10f}  {cat_err:<12.1e}  {cat == nearest!s:<7}  "
                  f"{got_err:<18.1e}  {got == nearest!s:<7}  {got_err <= cat_err}")


if __name__ == "__main__":
    main()
