"""Peak extra memory of order statistics over a bundle, in a fresh process.

Run from the repository root, one case per process (the peak is process-wide):

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/order_memory.py 33554432 8 quantile_abs

The arguments are the total elements, the number of equal float32 tensors, and the case:
quantile, topk, quantile_abs, topk_abs, sq_sum, cat_quantile_abs (the concatenating
baseline), or topk_sorted (elements in ascending order: each chunk beats the best k before
it). The malloc settings return freed memory to the system, so the peak reads true.
"""

import sys

import torch

import modtensor as mt


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    total, parts, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    if case == "topk_sorted":  # ascending across tensors; made directly, so that no temporary raises the peak
        tensors = [torch.linspace(i, i + 1, total // parts) for i in range(parts)]
    else:
        tensors = [torch.randn(total // parts) for _ in range(parts)]
    b = mt.bundle(tensors)
    cases = {
        "quantile": lambda: torch.quantile(b, 0.2),
        "topk": lambda: torch.topk(b, 1000),
        "topk_sorted": lambda: torch.topk(b, 1000),
        "quantile_abs": lambda: torch.quantile(b.abs(), 0.2),
        "topk_abs": lambda: torch.topk(b.abs(), 1000),
        "sq_sum": lambda: (b**2).sum(),
        "cat_quantile_abs": lambda: torch.kthvalue(torch.cat(tensors).abs(), int(0.2 * total)),
    }
    with torch.no_grad():
        small = mt.bundle([torch.randn(1000) for _ in range(parts)])
        torch.quantile(small.abs(), 0.2), torch.topk(small.abs(), 10)  # first-call allocations
        before = peak_mib()
        cases[case]()
        extra = peak_mib() - before
    size = total * 4 / 2**20
    print(f"{case}, {parts} tensors: peak extra {extra:.1f} MiB = {100 * extra / size:.1f}% of {size:.0f} MiB")


if __name__ == "__main__":
    main()
