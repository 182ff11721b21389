"""The Dask cluster of an encode: its layout, and the handle a command holds.

Two kinds of slots, told apart by resources: `reader` slots (single-threaded processes: GeoTIFF,
LMDB and parquet decoding is Python and GDAL work that threads of one process would serialise)
and `encoder` slots (the model). Read tasks go to reader slots and encode tasks to encoder slots
wherever the cluster declares them; on a cluster that declares neither (any `dask worker` started
without `--resources`) every task may run anywhere.

The local cluster: with GPUs, one encoder worker per GPU (pinned with CUDA_VISIBLE_DEVICES) and a
reader process per remaining core, so that reading never competes with feeding a GPU. Without a
GPU it depends on the model (BENCHMARKS.md): for a small one (csmoe-tiny), one worker per core
holding both slots, reading a chunk and encoding it where it lies (no pixels cross processes: for
a small model that transfer costs more than the model); for a large one (csmoe-p16, CSMAE), one
worker whose model uses every core while its other threads read (reading releases the GIL in
GDAL, and one model on all cores beats one per core).

On a real cluster, start workers with `--resources "reader=1"` on CPU-only nodes (they read for
the GPU nodes) and `--resources "encoder=1"` once per GPU (`README.md`).
"""

from __future__ import annotations

import logging
import os

from rsretrieve.errors import RSRetrieveError

ENCODER_RESOURCE = "encoder"
READER_RESOURCE = "reader"


CONNECT_TIMEOUT = 20  # seconds to wait for a --scheduler to answer
SMALL_MODEL = 10e6  # `model_cost` below which a CPU encodes in every core's process


def model_cost(config) -> float:
    """A rough per-patch cost of a model's dense layers (d^2 x tokens x layers), to pick a layout."""
    return config.embed_dim ** 2 * config.num_tokens * (config.depth_modality + config.depth_cross)


def local_layout(device: str = "auto", readers: int | None = None, small_model: bool = False) -> dict:
    """{worker name: spec} of the local cluster (module docstring). `readers`: reader processes
    (default: one per core, less one per GPU); `small_model` picks the CPU layout."""
    cores = os.cpu_count() or 1
    gpus = 0
    if device in ("auto", "cuda"):
        import torch

        gpus = torch.cuda.device_count()
    readers = readers if readers is not None else max(1, cores - gpus)
    if not gpus and small_model:
        both = {READER_RESOURCE: 1, ENCODER_RESOURCE: 1}
        return {f"worker-{j}": _worker(both, {"RSRETRIEVE_ENCODER_THREADS": "1"}) for j in range(readers)}
    if not gpus:  # OpenMP's default spin-wait here: the model owns the cores, reads are short
        spec = _worker({READER_RESOURCE: readers, ENCODER_RESOURCE: 1}, {"RSRETRIEVE_ENCODER_THREADS": str(cores), "OMP_WAIT_POLICY": "ACTIVE"})
        spec["options"]["nthreads"] = readers + 1  # an encode and `readers` reads at once
        return {"worker-0": spec}
    return gpu_layout(gpus, readers)


def gpu_layout(gpus: int, readers: int) -> dict:
    """One encoder worker per GPU, pinned to it with CUDA_VISIBLE_DEVICES (its `cuda` is that GPU),
    and `readers` single-threaded reader processes. The CPU tests build it for GPUs that are not
    there and encode on it with the device set to CPU, so its wiring is tested everywhere."""
    workers = {f"encoder-{i}": _worker({ENCODER_RESOURCE: 1}, {"CUDA_VISIBLE_DEVICES": str(i), "RSRETRIEVE_ENCODER_THREADS": "1"})
               for i in range(gpus)}
    workers.update({f"reader-{j}": _worker({READER_RESOURCE: 1}, {}) for j in range(readers)})
    return workers


def _worker(resources: dict, env: dict) -> dict:
    """A single-threaded worker process (a Nanny) declaring `resources`."""
    from distributed import Nanny

    # OMP_WAIT_POLICY: a model's idle threads sleep rather than spin on cores others read on
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_TRIM_THRESHOLD_": str(1 << 28), **env}
    return {"cls": Nanny, "options": {"nthreads": 1, "resources": resources, "env": env, "silence_logs": dask_log_level()}}


def local_cluster(device: str = "auto", readers: int | None = None, small_model: bool = False, dashboard: str | None = None,
                  workers: dict | None = None):
    """A SpecCluster of `local_layout` (or of the layout `workers`) on 127.0.0.1. No dashboard
    unless `dashboard` gives its address (e.g. ":8787"; it needs bokeh); without one no fixed port is bound."""
    from distributed import Scheduler, SpecCluster

    if dashboard:
        _require_bokeh()
        scheduler = {"cls": Scheduler, "options": {"dashboard": True, "dashboard_address": dashboard, "host": "127.0.0.1"}}
    else:  # its HTTP routes on an ephemeral port of 127.0.0.1 (None would bind :8787)
        scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}}
    workers = workers if workers is not None else local_layout(device, readers, small_model)
    for spec in workers.values():
        spec["options"]["host"] = "127.0.0.1"
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=dask_log_level(), name="rsretrieve")


def dask_log_level() -> int:
    """The level the cluster's processes log at: debug when this process's `distributed` logger
    is at debug (`-vv`), else nothing (a worker's heartbeat to a scheduler that is shutting down
    fails with a CommClosedError traceback; what goes wrong in a task is reported by the driver)."""
    return logging.DEBUG if logging.getLogger("distributed").getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL


def _require_bokeh() -> None:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        raise RSRetrieveError("--dashboard needs bokeh, Dask's dashboard library: pip install 'bokeh>=3.1'") from None


def task_resources(client) -> tuple[dict | None, dict | None]:
    """(resources of a read task, of an encode task): each slot kind is claimed only if some worker
    declares it, so a cluster of plain workers runs everything anywhere."""
    declared = [w.get("resources", {}) for w in client.scheduler_info().get("workers", {}).values()]
    read = {READER_RESOURCE: 1} if any(READER_RESOURCE in r for r in declared) else None
    encode = {ENCODER_RESOURCE: 1} if any(ENCODER_RESOURCE in r for r in declared) else None
    return read, encode


def slots(client) -> tuple[int, int]:
    """(read slots, encoder slots) of the cluster now."""
    workers = list(client.scheduler_info().get("workers", {}).values())
    readers = sum(int(w.get("resources", {}).get(READER_RESOURCE, 0)) for w in workers)
    encoders = sum(int(w.get("resources", {}).get(ENCODER_RESOURCE, 0)) for w in workers)
    threads = sum(int(w.get("nthreads", 1)) for w in workers)
    return readers or threads, encoders or max(1, len(workers))


class cluster:
    """The Dask client of an encode: a given client (or `cluster`), a connection to a scheduler, or
    a local cluster sized to the machine. Nothing starts before `get()`, and `with` closes what this
    object started, so a command that encodes both modalities enters one `cluster(...)`, passes it
    as `client` to each `encode`, and a run with nothing to encode starts nothing."""

    def __init__(self, client=None, scheduler: str | None = None, device: str = "auto", readers: int | None = None,
                 small_model: bool = False, dashboard: str | None = None, on_connect=None):
        self.given, self.scheduler, self.device, self.readers = client, scheduler, device, readers
        self.small_model, self.dashboard = small_model, dashboard
        self.on_connect = on_connect  # called with the client once it is up (the CLI prints the dashboard link)
        self.owned: list = []
        self._client = None

    @property
    def local(self) -> bool:
        """Whether the workers run on this machine (then its devices are theirs)."""
        if isinstance(self.given, cluster):
            return self.given.local
        return self.given is None and self.scheduler is None

    def __enter__(self) -> "cluster":
        return self

    def get(self):
        """The dask client, connected or started now if it was not yet."""
        from distributed import Client

        if isinstance(self.given, cluster):
            return self.given.get()
        if self.given is not None:
            return self.given
        if self._client is None:
            if self.scheduler:
                try:
                    self._client = Client(self.scheduler, timeout=f"{CONNECT_TIMEOUT}s")
                except (OSError, ValueError, TimeoutError) as exc:
                    raise RSRetrieveError(f"--scheduler {self.scheduler}: no scheduler answered within {CONNECT_TIMEOUT} s "
                                          f"({' '.join(str(exc).split())[:160]})") from None
            else:
                local = local_cluster(self.device, self.readers, self.small_model, self.dashboard)
                self.owned.append(local)
                self._client = Client(local)
            self.owned.insert(0, self._client)
            if self.on_connect is not None:
                self.on_connect(self._client)
        return self._client

    def __exit__(self, *exc) -> None:
        for thing in self.owned:
            thing.close()
        self.owned.clear()
        self._client = None
