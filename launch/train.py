"""distnorm's main job and the example to copy: train a small ResNet data-parallel with its
BatchNorms synchronized by distnorm.

    torchrun --standalone --nproc_per_node 2 launch/train.py      # 2 CPU processes (gloo)
    python launch/train.py                                        # 1 process, no process group

The data is scikit-learn's digits (1,797 8x8 images that ship inside the package: nothing
is downloaded). Each rank trains on its shard with a per-worker batch of 8 by default, the
small-batch regime in which synchronizing BatchNorm statistics matters.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import distnorm
from distnorm.examples import small_resnet


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
def evaluate(model: nn.Module, test: TensorDataset, rank: int, world_size: int) -> float:
    """Accuracy on the whole test set, each rank scoring every world_size-th sample."""
    model.eval()
    images, labels = test.tensors[0][rank::world_size], test.tensors[1][rank::world_size]
    correct = (model(images).argmax(dim=1) == labels).sum().item() if len(labels) else 0
    model.train()
    total_correct, total = all_ranks_sum([correct, len(labels)])
    return total_correct / total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per-worker-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-convert", action="store_true", help="keep local BatchNorm, for comparison"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoint folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # started by torchrun (or any launcher that sets the env:// variables)
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    train, test = digits(args.seed)
    model = small_resnet()
    if not args.no_convert:
        model = distnorm.convert_model(model)
        if rank == 0:
            print(distnorm.conversion_report(model))
    ddp_model = DistributedDataParallel(model) if dist.is_initialized() else model

    sampler = (
        DistributedSampler(train, shuffle=True, seed=args.seed) if dist.is_initialized() else None
    )
    loader = DataLoader(train, args.per_worker_batch, shuffle=sampler is None, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(loader))

    if rank == 0:
        print(
            f"world size {world_size}, per-worker batch {args.per_worker_batch}, "
            f"global batch {world_size * args.per_worker_batch}"
        )
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for images, labels in tqdm(
            loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False
        ):
            loss = F.cross_entropy(ddp_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
        total_loss, total_seen = all_ranks_sum([loss_sum, seen])
        accuracy = evaluate(model, test, rank, world_size)
        if rank == 0:
            print(
                f"epoch {epoch + 1:2d}  train loss {total_loss / total_seen:.4f}  "
                f"test accuracy {100 * accuracy:.2f}%"
            )

    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        checkpoint = args.out / "checkpoint.pt"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": args.epochs,
                "args": vars(args),
            },
            checkpoint,
        )
        print(
            f"final test accuracy {100 * accuracy:.2f}%; checkpoint saved to {checkpoint.resolve()}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
