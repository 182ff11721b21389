"""`make gpu-check`: on a lent GPU machine, the `cuda` tests and one run of every measurement issue
28 asks for, printed as a BENCHMARKS.md-ready table. Without CUDA it is a dry run: every step runs
on the CPU at a tiny size except the CUDA-only ones (compiled encoder), it prints `dry run` and
exits 0 when the steps did.

    tools/gpu_check.sh [--dry] [--steps tests,encoder,e2e,ivfpq]   (make gpu-check)

Steps: `pytest -m cuda`; the encoder alone (csmoe-p16, S2, batch 1024: autocast float32 weights,
bfloat16 weights, compiled); end to end from an LMDB, the GeoTIFF tree and Major TOM shards with
reader processes (benchmarks/bench_pipeline.py); IVF-PQ training and search through faiss on the
GPU, in RAM and on disk (ivfpq-disk: trained on the GPU, queries assigned to lists there, lists
scanned and re-ranked on the CPU); skipped, saying so, where faiss is not installed (GPU.md says
it cannot be carried).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="the dry run even where CUDA is available")
    parser.add_argument("--steps", default="tests,encoder,e2e,ivfpq")
    args = parser.parse_args()
    import torch

    dry = args.dry or not torch.cuda.is_available()
    print("dry run: no CUDA device; every step runs on the CPU at a tiny size but the CUDA-only ones" if dry
          else f"GPU check on {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}", flush=True)
    rows: list[tuple[str, str, str]] = []
    failed = []
    steps = {"tests": cuda_tests, "encoder": encoder_alone, "e2e": end_to_end, "ivfpq": ivfpq}
    for name in args.steps.split(","):
        t0 = time.perf_counter()
        try:
            rows.extend(steps[name](dry))
        except Exception as exc:  # noqa: BLE001 — one step failing must not hide the others' numbers
            failed.append(name)
            rows.append((name, "FAILED", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"))
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
    print_table(rows, dry)
    return 1 if failed else 0


# -- steps ------------------------------------------------------------------------------------------
def cuda_tests(dry: bool) -> list[tuple[str, str, str]]:
    """`pytest -m cuda` (they skip themselves without CUDA: in a dry run, collected and skipped)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=REPO, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"cuda tests: {last}")
    return [("cuda tests", "-", last)]


def encoder_alone(dry: bool) -> list[tuple[str, str, str]]:
    """Patches/s of the model alone on raw S2 pixels already in memory."""
    import numpy as np
    import torch

    from rsretrieve.indexer.encoder import EncoderSpec, worker_model
    from rsretrieve.models.inference import embed_raw

    model, device, batch, n = ("csmoe-tiny", "cpu", 8, 32) if dry else ("csmoe-p16", "cuda", 1024, 8192)
    raw = synthetic_s2(n)
    out = []
    variants = [("eager, float32 weights (autocast)", "float32", False), ("eager, bfloat16 weights", "bfloat16", False),
                ("compiled, bfloat16 weights", "bfloat16", True)]
    for label, precision, compiled in variants:
        if compiled and dry:
            out.append((f"encoder {model}: {label}", "-", "skipped (dry run: CUDA only)"))
            continue
        spec = EncoderSpec(model, device, batch, precision=precision, compile=compiled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = worker_model(spec, device)
        t0 = time.perf_counter()
        embed_raw(m, raw.take(slice(0, batch)), "s2", device, batch, fixed_shape=compiled)  # warm-up (and the compile)
        warm = time.perf_counter() - t0
        sync(device)
        t0 = time.perf_counter()
        vectors = embed_raw(m, raw, "s2", device, batch, fixed_shape=compiled)
        sync(device)
        seconds = time.perf_counter() - t0
        assert np.isfinite(vectors).all()
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
        out.append((f"encoder {model}: {label}", f"{n / seconds:,.0f}", f"batch {batch}, {n} patches, warm-up {warm:.1f} s{peak}"))
    return out


def end_to_end(dry: bool) -> list[tuple[str, str, str]]:
    """benchmarks/bench_pipeline.py's reader pool, encoder alone and end to end, per source."""
    import bench_pipeline as bp

    from rsretrieve.indexer.pipeline import DatasetSpec

    model, device = ("csmoe-tiny", "cpu") if dry else ("csmoe-p16", "cuda")
    n, batch, chunk = (24, 8, 8) if dry else (4096, 512, 128)
    readers = 2 if dry else max(1, (os.cpu_count() or 2) - 1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = bp.replicate_tree(tmp / "tree", n)
        specs = {"GeoTIFF tree": DatasetSpec("benv2", str(tree), options=(("chunk_size", chunk),)),
                 "LMDB": DatasetSpec("benv2", str(bp.make_lmdb(tree, tmp / "lmdb")), options=(("chunk_size", chunk),)),
                 "Major TOM": DatasetSpec("majortom", str(bp.make_majortom(tmp / "mt", max(1, n // 100))))}
        for source, spec in specs.items():
            pool_s, pool_n = bp.reader_pool(spec, readers)
            e2e_s, e2e_n = bp.end_to_end(spec, model, device, batch, readers, tmp)
            out.append((f"end to end {model} from {source}", f"{e2e_n / e2e_s:,.0f}",
                        f"{e2e_n} patches, {readers} readers, reader pool {pool_n / pool_s:,.0f}/s, e2e/pool {e2e_n / e2e_s / (pool_n / pool_s):.2f}"))
    return out


def ivfpq(dry: bool) -> list[tuple[str, str, str]]:
    """IVF-PQ trained and searched through faiss (on the GPU where faiss has one)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return [("IVF-PQ on the GPU", "-", "skipped: faiss is not installed here (GPU.md: it cannot be carried)")]
    import numpy as np

    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    n, dim, nlist = (4000, 64, 32) if dry else (1_000_000, 768, 4096)
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    index = EmbeddingIndex.from_vectors(x, kind="ivfpq", use_gpu=True, nlist=nlist, m=dim // 8, nprobe=16, k_factor=4.0)
    build = time.perf_counter() - t0
    queries = x[:2048]
    t0 = time.perf_counter()
    _, rows = index.search(queries, 10)
    search = time.perf_counter() - t0
    where = index.gpu_notice or "searched on the GPU, re-ranked on the CPU"
    return [("IVF-PQ build (train + add)", f"{n / build:,.0f}", f"{n} x {dim}, nlist {nlist}; vectors/s"),
            ("IVF-PQ search, k 10", f"{len(queries) / search:,.0f}", f"queries/s; self found first {np.mean(rows[:, 0] == np.arange(len(queries))):.3f}; {where}"),
            *ivfpq_disk(x[:200_000], queries, nlist)]  # 200k: writing the store and OPQ training fit the 8 minutes


def ivfpq_disk(x, queries, nlist: int) -> list[tuple[str, str, str]]:
    """ivfpq-disk over `x` written to a store: built (trained on the GPU), saved, loaded to search
    with its coarse quantizer on the GPU."""
    import numpy as np

    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", x)
        t0 = time.perf_counter()
        built = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", use_gpu=True, nlist=nlist, nprobe=16, k_factor=4.0)
        build = time.perf_counter() - t0
        index = EmbeddingIndex.load(built.save(Path(tmp) / "index" / "s2"), store_path=store.path, use_gpu=True)
        t0 = time.perf_counter()
        _, rows = index.search(queries, 10)
        search = time.perf_counter() - t0
    where = index.gpu_notice or "lists assigned on the GPU, scanned and re-ranked on the CPU"
    return [("ivfpq-disk build (train + add + merge)", f"{len(x) / build:,.0f}", f"vectors/s; {built.gpu_notice or 'trained on the GPU'}"),
            ("ivfpq-disk search, k 10", f"{len(queries) / search:,.0f}",
             f"queries/s; self found first {np.mean(rows[:, 0] == np.arange(len(queries))):.3f}; {where}")]


def write_store(path: Path, x):
    """A float16 store group "s2" holding `x` (what an encode would have written)."""
    import numpy as np
    import pyarrow as pa

    from rsretrieve.store import EmbeddingStore
    from rsretrieve.store.zarr_store import ChunkSpan

    n, step = len(x), 65_536
    ids = [f"p{i:08d}" for i in range(n)]
    spans = [ChunkSpan(f"c{i}", start, min(start + step, n)) for i, start in enumerate(range(0, n, step))]
    store = EmbeddingStore(path)
    store.create("s2", pa.table({"patch_id": ids, "lat": np.zeros(n), "lon": np.zeros(n)}), spans, x.shape[1],
                 {"model": "gpu-check", "config": {}, "checkpoint_sha256": "none", "preprocessing": {}}, dtype="float16")
    for span in spans:
        store.write_chunk("s2", span, ids[span.start:span.stop], x[span.start:span.stop].astype(np.float16))
    return store


# -- helpers -----------------------------------------------------------------------------------------
def synthetic_s2(n: int):
    """`n` S2 patches of raw uint16 digital numbers, every band on the 10 m grid (120 px)."""
    import numpy as np

    from rsretrieve.datasets import open_dataset
    from rsretrieve.pixels import RawPixels

    ds = open_dataset("sample", include_snow_cloud=True)
    real = RawPixels.concat([ds.read_chunk(c).pixels for c in ds.chunks("s2")])
    return real.take(np.arange(n) % len(real))


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def print_table(rows: list[tuple[str, str, str]], dry: bool) -> None:
    import torch

    where = "dry run (CPU, tiny sizes: not results)" if dry else f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} cores"
    print(f"\n### GPU check, {time.strftime('%Y-%m-%d')}: {where}; `make gpu-check`, torch {torch.__version__}, {platform.python_version()}\n")
    print("| measurement | patches/s | notes |")
    print("|---|---:|---|")
    for what, rate, notes in rows:
        print(f"| {what} | {rate} | {notes} |")
    if dry:
        print("\ndry run")


if __name__ == "__main__":
    raise SystemExit(main())
