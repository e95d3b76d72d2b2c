r"""distnorm's main job and the example to copy: train a small ResNet data-parallel, with its
BatchNorms converted by distnorm's policy, under whichever launcher you already use.

    python launch/train.py                                      # 1 process
    torchrun --standalone --nproc_per_node 2 launch/train.py    # DDP, gloo on CPU
    accelerate launch --config_file configs/accelerate/cpu.yaml launch/train.py
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py \
        --deepspeed_config configs/deepspeed/zero2.json         # ZeRO-2 (zero0/zero1.json too)
    mpiexec -n 2 python launch/train.py                         # rank and world from mpi4py
    sbatch launch/slurm.sbatch                                  # multi-node torchrun (SLURM)

The script is the same under all of them: ``distnorm.distributed.init_distributed`` joins
the ranks whatever started them, ``distnorm.plan`` decides each BatchNorm's replacement from
the per-worker batch and the world size (printed on rank 0), ``convert_model`` applies it,
and the model is wrapped for DDP, Accelerate (under ``accelerate launch``) or DeepSpeed
(with ``--deepspeed_config``): see launch/engines.py.

The data is scikit-learn's digits (1,797 8x8 images that ship inside the package: nothing
is downloaded). Each rank trains on its shard with a per-worker batch of 16: under the
default policy's target of 32 samples per statistic, 2 ranks get SyncBatchNorm over both.
A checkpoint is written after every epoch and ``--resume`` continues from it under any
launcher with the same number of processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from engines import AccelerateEngine, DDPEngine, DeepSpeedEngine  # launch/engines.py
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import distnorm
from distnorm.distributed import DistributedContext, init_distributed
from distnorm.examples import small_resnet

DEFAULT_PER_WORKER_BATCH = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="length of the LR schedule")
    parser.add_argument(
        "--stop-after-epoch", type=int, help="end this run after that epoch (resume later)"
    )
    parser.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (smoke tests)")
    parser.add_argument(
        "--per-worker-batch",
        type=int,
        help=f"samples per rank per step (default {DEFAULT_PER_WORKER_BATCH}, or the DeepSpeed "
        "config's train_micro_batch_size_per_gpu)",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="default", help="distnorm policy name or YAML file")
    parser.add_argument(
        "--no-convert", action="store_true", help="keep local BatchNorm, for comparison"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoint folder")
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from")
    parser.add_argument("--summary-dir", type=Path, help="write one JSON summary per rank here")
    parser.add_argument("--deepspeed_config", help="train with DeepSpeed using this JSON config")
    # The deepspeed launcher (and torch.distributed.launch) pass --local_rank; the rank
    # actually used is read from the environment by init_distributed.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deepspeed_config and args.per_worker_batch:
        parser.error("with --deepspeed_config the per-worker batch comes from the config")
    return args


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (1, 8, 8) float images in [0, 1]: 1,000 train, 797 test."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(
        range(len(labels)), train_size=1000, stratify=labels, random_state=seed
    )
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )


def all_ranks_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (identity when not distributed)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, test: TensorDataset, ctx: DistributedContext) -> float:
    """Accuracy on the whole test set, each rank scoring every world_size-th sample."""
    model.eval()
    images, labels = (t[ctx.rank :: ctx.world_size] for t in test.tensors)
    predictions = model(images.to(ctx.device)).argmax(dim=1).cpu()
    model.train()
    correct, total = all_ranks_sum([(predictions == labels).sum().item(), len(labels)])
    return correct / total


def wrap(
    model: nn.Module, optimizer: Any, schedule: Any, ctx: DistributedContext, args: Any
) -> DDPEngine | AccelerateEngine | DeepSpeedEngine:
    """DeepSpeed with a DeepSpeed config, Accelerate under ``accelerate launch``, else DDP."""
    if args.deepspeed_config:
        engine = DeepSpeedEngine(model, optimizer, schedule, ctx, args.deepspeed_config)
    elif "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by accelerate launch
        engine = AccelerateEngine(model, optimizer, schedule, ctx)
    else:
        engine = DDPEngine(model, optimizer, schedule, ctx)
    if engine.world_size != ctx.world_size:
        raise SystemExit(
            f"{engine.name} sees {engine.world_size} processes but the process group has "
            f"{ctx.world_size}: each rank would train alone; check the launcher's flags"
        )
    return engine


def layer_fingerprints(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each normalization layer's class, sync group (and its member ranks) and a SHA-256 of
    its running statistics: equal digests on two ranks mean bitwise-identical statistics."""
    modules = dict(model.named_modules())
    fingerprints = {}
    for row in distnorm.conversion_report(model).rows:
        module = modules["" if row.name == "(root)" else row.name]
        digest = hashlib.sha256()
        for buffer in module.buffers(recurse=False):
            digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
        fingerprints[row.name] = {"now": row.converted, "group": row.sync_group}
        fingerprints[row.name]["group_ranks"] = sync_ranks(module)
        fingerprints[row.name]["running_stats_sha256"] = digest.hexdigest()
    return fingerprints


def sync_ranks(module: nn.Module) -> list[int] | None:
    """The ranks whose batches a layer's statistics span (None: it shares nothing)."""
    group = getattr(module, "process_group", distnorm.comm.LOCAL)
    if group is distnorm.comm.LOCAL or not dist.is_initialized():
        return None
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state_dict (parameters and buffers, in key order)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: an interrupted save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def write_summary(
    folder: Path,
    record: dict[str, Any],
    ctx: DistributedContext,
    engine: Any,
    model: nn.Module,
    plan: distnorm.Plan,
) -> None:
    """One JSON file per rank: what this process saw (world size, per the process group and
    per the engine), its losses, and fingerprints of its final state, for comparing ranks."""
    record.update(
        rank=ctx.rank,
        world_size=ctx.world_size,
        local_rank=ctx.local_rank,
        node_rank=os.environ.get("GROUP_RANK"),  # torchrun's node (agent) rank, if any
        engine_world_size=engine.world_size,
        launcher=ctx.launcher,
        engine=engine.name,
        backend=ctx.backend,
        final_state_sha256=state_digest(model),
        norm_layers=layer_fingerprints(model),
        plan=plan.to_dict(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{ctx.rank}.json").write_text(json.dumps(record, indent=1, default=str))


def main() -> None:
    args = parse_args()
    # torchrun, accelerate, deepspeed, mpirun, srun or one process (DeepSpeed wants a
    # process group even then: a one-rank one).
    ctx = init_distributed(init_single_process=args.deepspeed_config is not None)
    torch.manual_seed(args.seed)
    if ctx.device.type == "cpu":  # share the cores among this node's ranks
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))

    train, test = digits(args.seed)
    model = small_resnet()
    checkpoint = torch.load(args.resume, map_location="cpu") if args.resume else None

    # Decide each BatchNorm's replacement, show it, apply it. A resumed run replays the
    # checkpoint's plan (same layers, same state_dict) when the world size is unchanged.
    batch = args.deepspeed_config or args.per_worker_batch or DEFAULT_PER_WORKER_BATCH
    saved_plan = checkpoint and checkpoint.get("plan")
    if saved_plan and saved_plan["world_size"] == ctx.world_size:
        plan = distnorm.Plan.from_dict(saved_plan)
    else:
        sample = train.tensors[0][:2]  # lets the plan count the values each statistic sees
        plan = distnorm.plan(model, batch, policy=args.policy, sample_input=sample)
    if not args.no_convert:
        if ctx.is_main_process:
            print(plan)
        model = distnorm.convert_model(model, plan=plan)

    sampler = DistributedSampler(train, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, plan.per_worker_batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = min(len(loader), args.steps_per_epoch or len(loader))
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)

    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        schedule.load_state_dict(checkpoint["schedule"])
        start_epoch = checkpoint["epoch"]
    initial_digest = state_digest(model)
    engine = wrap(model, optimizer, schedule, ctx, args)
    if checkpoint is not None:
        engine.load_optimizer_state(checkpoint["optimizer"])
        if ctx.is_main_process:
            print(f"resumed from {args.resume} at epoch {start_epoch}")

    if ctx.is_main_process:
        print(
            f"{ctx.launcher}: {ctx.world_size} process(es), {engine.name}, backend "
            f"{ctx.backend or 'none'}; per-worker batch {plan.per_worker_batch_size}, "
            f"global batch {ctx.world_size * plan.per_worker_batch_size}"
        )
    summary: dict[str, Any] = {"step_losses": [], "epoch_losses": [], "accuracies": []}
    last_epoch = min(args.stop_after_epoch or args.epochs, args.epochs)
    out = args.out / "checkpoint.pt"
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        progress = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not ctx.is_main_process,
            leave=False,
        )
        for images, labels in islice(loader, steps_per_epoch):
            images, labels = images.to(engine.device), labels.to(engine.device)
            loss = F.cross_entropy(engine(images), labels)
            engine.step(loss)
            summary["step_losses"].append(loss.item())
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update()
        progress.close()
        total_loss, total_seen = all_ranks_sum([loss_sum, seen])
        accuracy = evaluate(model, test, ctx)
        summary["epoch_losses"].append(total_loss / total_seen)
        summary["accuracies"].append(accuracy)
        if ctx.is_main_process:
            print(
                f"epoch {epoch + 1:2d}  train loss {total_loss / total_seen:.4f}  "
                f"test accuracy {100 * accuracy:.2f}%"
            )
        state = {
            "model": model.state_dict(),
            "optimizer": engine.optimizer_state(),  # every rank: gathers ZeRO partitions
            "schedule": schedule.state_dict(),
            "epoch": epoch + 1,
            "plan": plan.to_dict(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        if ctx.is_main_process:
            save_checkpoint(out, state)

    if start_epoch >= last_epoch:  # resumed a finished run: nothing trained, just score it
        accuracy = evaluate(model, test, ctx)
    if ctx.is_main_process:
        print(f"final test accuracy {100 * accuracy:.2f}%; checkpoint: {out.resolve()}")
    if args.summary_dir:
        summary.update(start_epoch=start_epoch, end_epoch=last_epoch, resumed_from=args.resume)
        summary.update(initial_state_sha256=initial_digest)
        write_summary(args.summary_dir, summary, ctx, engine, model, plan)
    ctx.close()


if __name__ == "__main__":
    main()
