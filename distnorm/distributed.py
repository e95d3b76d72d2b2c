"""Process-group set-up for a training script, whichever launcher started it.

One call, before the model is converted, joins the ranks of a data-parallel job::

    ctx = distnorm.distributed.init_distributed()   # torchrun, accelerate, deepspeed, mpirun, srun
    model = distnorm.convert_model(model, per_worker_batch_size=16)
    ...
    ctx.close()

Where the ranks come from, in this order: a process group that already exists (Accelerate
or DeepSpeed made it: described, not replaced); torchrun-style variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...: torchrun, ``accelerate launch``, ``deepspeed``) with
``env://`` rendezvous; MPI (``mpi4py``'s ``COMM_WORLD``, rank 0 broadcasting a TCP store's
address, so no port to agree on); SLURM tasks of ``srun`` with ``MASTER_ADDR``/``PORT``
exported; otherwise a single process (a one-rank group on request). The numbers come from
:func:`distnorm.world.world_layout`, the one reader of launcher variables; the
torchrun-style variables are then set for libraries that read them later.

NCCL when CUDA is available (rank on GPU ``LOCAL_RANK``), gloo otherwise. Every
collective has a deadline, :data:`DEFAULT_TIMEOUT` unless the caller or
``DISTNORM_TIMEOUT_S`` says otherwise: short enough to end a job whose rank hung (torch's
gloo default is 30 minutes), long enough for legitimate waits (a checkpoint written by
rank 0, a first step compiling kernels; ``docs/launching.md``). Besides :mod:`.comm`,
:mod:`.world` and :mod:`.uneven`, the only module that calls ``torch.distributed``.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distnorm.errors import DistNormError
from distnorm.logs import get_logger
from distnorm.world import world_layout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = get_logger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)
TIMEOUT_VARIABLE = "DISTNORM_TIMEOUT_S"

# Variables that say which kind of launcher started this process (the numbers themselves
# are read by world.world_layout).
_ENV_RENDEZVOUS = ("WORLD_SIZE",)
_MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_SLURM_VARIABLES = ("SLURM_NTASKS", "SLURM_PROCID")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job: what :func:`init_distributed` found or made.

    ``backend`` is ``None`` when there is no process group (a single process).
    ``launcher`` says where the ranks came from, for logs. ``owns_group`` is true when
    :func:`init_distributed` created the process group, which :meth:`close` then destroys.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    launcher: str
    timeout: timedelta
    owns_group: bool

    @property
    def is_distributed(self) -> bool:
        """True when a process group joins this process to others."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one that prints, evaluates for the log and writes checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def collective_timeout(timeout: timedelta | None = None) -> timedelta:
    """``timeout`` if given, else ``DISTNORM_TIMEOUT_S`` seconds if set, else
    :data:`DEFAULT_TIMEOUT`."""
    if timeout is not None:
        if timeout.total_seconds() <= 0:
            raise DistNormError(f"the collective timeout must be positive, got {timeout}")
        return timeout
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise DistNormError(
            f"{TIMEOUT_VARIABLE}={value!r} must be a positive number of seconds; fix or unset it"
        )
    return timedelta(seconds=seconds)


def init_distributed(
    backend: str | None = None,
    timeout: timedelta | None = None,
    *,
    init_single_process: bool = False,
) -> DistributedContext:
    """Join this process to its job's default process group and describe where it stands.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (the process then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. ``timeout`` bounds every collective (see the
    module docstring for the default and why). A single process gets no process group
    unless ``init_single_process`` asks for a one-rank one. Call it on every rank, before
    converting or wrapping the model; an existing process group is kept as it is.
    """
    timeout = collective_timeout(timeout)
    if dist.is_available() and dist.is_initialized():
        return _existing_group(timeout)

    launcher = _launcher()
    if launcher == "MPI":
        rank, world_size, local_rank, local_size, store = _mpi_rendezvous(timeout)
    else:
        layout = world_layout()
        rank, world_size, local_size = layout.rank, layout.world_size, layout.ranks_per_node
        local_rank = _local_rank(launcher)
        store = None
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = _device(backend, local_rank)

    if world_size == 1 and not init_single_process:
        return DistributedContext(0, 1, 0, None, device, "single process", timeout, False)

    if store is None and world_size == 1:
        store = dist.HashStore()  # nothing to meet: no address or port needed
    elif store is None:
        _require_address(launcher)
    # Libraries initialized later (Accelerate, DeepSpeed) read the torchrun-style variables.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        **({"LOCAL_WORLD_SIZE": str(local_size)} if local_size else {}),
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    context = DistributedContext(
        rank, world_size, local_rank, backend, device, launcher, timeout, True
    )
    logger.info(
        "distnorm.distributed: %s process group of %d ranks from %s, collective timeout %ss",
        backend,
        world_size,
        launcher,
        f"{timeout.total_seconds():g}",
    )
    return context


def data_parallel_group(mpu: Any = None) -> ProcessGroup | None:
    """The process group of this rank's data-parallel replicas: the ranks among which
    BatchNorm statistics may be synchronized.

    Under model parallelism the ranks of one tensor-parallel group hold parts of the
    *same* samples, and pipeline stages hold different layers, so synchronizing a
    BatchNorm over the whole world would mix what must not be mixed; only replicas of the
    same model shard (seeing different samples) form a valid group. Pass it on:
    ``convert_model(model, process_group=data_parallel_group(mpu))``.

    ``mpu`` is a Megatron-style model-parallel unit (the object given to
    ``deepspeed.initialize(mpu=...)``, with ``get_data_parallel_group()``). Without it,
    DeepSpeed's own record is used when DeepSpeed is imported and has set up model
    parallelism (``deepspeed.utils.groups``: a registered ``mpu``, or the data-parallel
    group of its tensor parallelism). Otherwise every rank is a replica: ``None``, the
    default (whole-world) group. A ``torch.distributed.DeviceMesh`` user passes
    ``mesh.get_group("dp")`` (their data-parallel dimension) to ``convert_model`` directly.
    """
    if mpu is not None:
        return mpu.get_data_parallel_group()
    groups = sys.modules.get("deepspeed.utils.groups")  # only if the job imported DeepSpeed
    if getattr(groups, "mpu", None) is not None:
        return groups.mpu.get_data_parallel_group()
    return getattr(groups, "_DATA_PARALLEL_GROUP", None)


def _existing_group(timeout: timedelta) -> DistributedContext:
    """Describe a process group someone else created (it keeps its own timeout)."""
    backend = str(dist.get_backend())
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _device(backend, local_rank)
    return DistributedContext(
        dist.get_rank(),
        dist.get_world_size(),
        local_rank,
        backend,
        device,
        "existing process group",
        timeout,
        False,
    )


def _launcher() -> str:
    """Which rendezvous applies, in the precedence of world.world_layout."""
    if any(os.environ.get(v) for v in _ENV_RENDEZVOUS):
        return "torchrun-style environment"
    if any(os.environ.get(v) for v in _MPI_VARIABLES):
        return "MPI"
    if all(os.environ.get(v) for v in _SLURM_VARIABLES):
        return "SLURM"
    return "single process"


def _local_rank(launcher: str) -> int:
    if launcher == "SLURM":
        return _env_int("SLURM_LOCALID", 0)
    return _env_int("LOCAL_RANK", 0)


def _env_int(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise DistNormError(
            f"environment variable {variable}={value!r} is not an integer"
        ) from None


def _device(backend: str, local_rank: int) -> torch.device:
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _require_address(launcher: str) -> None:
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if not missing:
        return
    hint = {
        "SLURM": "export them in the batch script: MASTER_ADDR=$(scontrol show hostnames "
        '"$SLURM_JOB_NODELIST" | head -n 1) and a free MASTER_PORT (see launch/slurm.sbatch)',
        "MPI": "install mpi4py (then rank 0's address is shared over MPI), or export them "
        "to every rank (mpiexec -x / -genv)",
    }.get(launcher, "the launcher should set them; export them to every rank")
    raise DistNormError(
        f"distnorm.distributed: {', '.join(missing)} not set for a {launcher} job: {hint}"
    )


def _mpi_rendezvous(
    timeout: timedelta,
) -> tuple[int, int, int, int, dist.Store | None]:
    """Rank, world size, local rank, ranks on this node, and a TCP store opened by rank 0
    at an address it broadcast over MPI (None without mpi4py: then env:// is used)."""
    try:
        from mpi4py import MPI
    except ImportError:
        layout = world_layout()
        local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", _env_int("MPI_LOCALRANKID", 0))
        return layout.rank, layout.world_size, local, layout.ranks_per_node or 0, None

    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    if world_size == 1:
        return rank, world_size, local_rank, local_size, None

    store = None
    address = None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if local_size == world_size else socket.gethostbyname(socket.gethostname())
        )
        port = int(os.environ.get("MASTER_PORT") or 0)  # 0: the OS picks a free port
        try:
            store = dist.TCPStore(
                host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False
            )
            address = (host, store.port)
        except Exception as error:  # tell the other ranks instead of leaving them waiting
            world.bcast(repr(error), root=0)
            raise
    address = world.bcast(address, root=0)
    if isinstance(address, str):
        raise DistNormError(f"rank 0 could not open the rendezvous store: {address}")
    if rank != 0:
        store = dist.TCPStore(address[0], address[1], world_size, is_master=False, timeout=timeout)
    os.environ.update(MASTER_ADDR=address[0], MASTER_PORT=str(address[1]))
    return rank, world_size, local_rank, local_size, store
