"""Encoder throughput vs this machine's matmul rate (not a test).

    .venv/bin/python benchmarks/bench_model.py                  # CPU, float32, batch 32
    .venv/bin/python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 256

Prints one table: measured matmul rate (torch.mm, 4096² on CPU / 8192² on CUDA), images/s for
csmoe-p16, csmoe-p32, csmae-p15 (S2 input, inference_mode, warm-up first), each model's achieved
fraction of the matmul rate (2 × MACs × images/s / rate), and the csmoe-p16/csmae-p15 time ratio
against their MAC ratio. Random weights: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsretrieve.models.csmoe import create_model  # noqa: E402
from rsretrieve.models.macs import model_macs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n, repeats) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", default="csmoe-p16,csmoe-p32,csmae-p15")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    mm_n = 8192 if device.type == "cuda" else 4096
    names = args.models.split(",")
    models = {n: create_model(n, seed=0, device=device) for n in names}
    inputs = {n: torch.randn(args.batch, m.config.s2_chans, m.config.img_size, m.config.img_size, device=device)
              for n, m in models.items()}
    macs = {n: model_macs(m.config, "s2") for n, m in models.items()}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    # Round-robin repeats (matmul probe, then each model) and best-of times: robust to other load
    # on a shared machine, and every figure is taken under the same conditions.
    best = {n: float("inf") for n in names}
    rates = []
    with torch.inference_mode(), autocast:
        for i in range(args.warmup + args.repeats):
            rates.append(matmul_rate(device, dtype, mm_n, 3))
            for n in names:
                sync(device)
                t = time.perf_counter()
                models[n].embed(inputs[n], "s2")
                sync(device)
                if i >= args.warmup:
                    best[n] = min(best[n], time.perf_counter() - t)
    rate = max(rates)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} repeats={args.repeats} (best of, round-robin) load1={load:.1f}")
    print(f"matmul rate (torch.mm {mm_n}x{mm_n}, best): {rate / 1e9:,.1f} GFLOP/s")
    print(f"{'model':<11} {'GMAC/img':>9} {'img/s':>9} {'ms/img':>8} {'GFLOP/s':>8} {'% of mm rate':>13}")
    for n in names:
        ips = args.batch / best[n]
        achieved = 2 * macs[n] * ips
        print(f"{n:<11} {macs[n] / 1e9:>9.2f} {ips:>9.2f} {1e3 / ips:>8.1f} {achieved / 1e9:>8.1f} {100 * achieved / rate:>12.1f}%")
    if "csmoe-p16" in best and "csmae-p15" in best:
        t_ratio = best["csmoe-p16"] / best["csmae-p15"]
        m_ratio = macs["csmoe-p16"] / macs["csmae-p15"]
        print(f"csmoe-p16 / csmae-p15: time ratio {t_ratio:.2f}, MAC ratio {m_ratio:.2f} "
              f"(time/MAC {t_ratio / m_ratio:.2f}; paper MAC ratio 10.11/5.64 = {10.11 / 5.64:.2f})")


if __name__ == "__main__":
    main()
