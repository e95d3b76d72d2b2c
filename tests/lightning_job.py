"""A real Lightning job for tests/test_lightning.py: ``python -m tests.lightning_job OUT``.

``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` re-runs this module in a second
process (Lightning's own launcher), so it runs as a script, not inside pytest. Four fits
of a small ResNet on generated 8x8 images, each rank recording into ``OUT/rank{r}.pt``:

* ``control``: ``DistNormSync(norm="bn")``, local BatchNorm, whose statistics drift apart;
* ``planned``: ``DistNormSync(per_worker_batch_size=8)``, 2 ranks x 8 = 16 samples, which
  the policy synchronizes over the world (SyncBatchNorm);
* ``first``: ``DistNormSync(per_worker_batch_size=2)`` as plugin and callback (the plan:
  Batch Group Norm + WS), 3 steps, then a checkpoint;
* ``resumed``: a fresh model resumed from that checkpoint to step 6, the same way.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

import distnorm
from distnorm.examples import small_resnet
from distnorm.lightning import DistNormSync

SAMPLES = 64  # 32 per rank


class Classifier(lightning.LightningModule):
    """small_resnet on 8x8 images; records what the normalization layers are and hold."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__()
        self.net = small_resnet(num_classes=4, width=8)
        self.record = record

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_train_start(self) -> None:  # after apply, checkpoint restore, DDP wrapping
        self.record["classes_in_training"] = norm_classes(self)
        self.record["report"] = str(distnorm.conversion_report(self))
        self.record["start_step"] = self.trainer.global_step
        self.record["start_stats"] = running_stats(self)

    def on_train_end(self) -> None:  # still converted: Lightning reverts after this
        self.record["end_step"] = self.trainer.global_step
        self.record["end_stats"] = running_stats(self)
        path = self.record.get("save_to")
        if path:
            self.trainer.save_checkpoint(path)


def norm_classes(module: nn.Module) -> dict[str, str]:
    """Each normalization layer's and convolution's class: the distnorm class it is an
    instance of (``distnorm.SyncBatchNorm``, ...), else its own qualified name."""
    kinds = (
        distnorm.BatchGroupNorm, distnorm.BatchChannelNorm, distnorm.SyncBatchNorm,
        distnorm.FrozenBatchNorm, distnorm.WSConv2d,
    )  # fmt: skip
    classes = {}
    for name, m in module.named_modules():
        if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.Conv2d)):
            kind = next((k for k in kinds if isinstance(m, k)), type(m))
            classes[name] = f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    return classes


def running_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().clone()
        for name, value in module.state_dict().items()
        if "running_" in name
    }


def fit(
    name: str,
    sync: DistNormSync,
    max_steps: int,
    batch_size: int,
    *,
    as_callback: bool = False,
    ckpt_path: str | None = None,
    save_to: str | None = None,
) -> dict[str, Any]:
    lightning.seed_everything(0, verbose=False)
    record: dict[str, Any] = {"save_to": save_to}
    model = Classifier(record)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(SAMPLES, 1, 8, 8, generator=generator) * 2 + 1
    labels = torch.randint(0, 4, (SAMPLES,), generator=generator)
    data = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    trainer = lightning.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        plugins=[sync],
        callbacks=[sync] if as_callback else [],
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(model, data, ckpt_path=ckpt_path)
    record["seconds"] = time.perf_counter() - started
    record["classes_after_fit"] = norm_classes(model)  # Lightning has called revert
    record["world_size"] = trainer.world_size
    record["rank"] = trainer.global_rank
    record.pop("save_to")
    print(f"[lightning_job] {name}: rank {trainer.global_rank}, {record['seconds']:.1f} s")
    return record


def main(out: Path) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    checkpoint = str(out / "first.ckpt")
    results = {
        "control": fit("control", DistNormSync(norm="bn"), 3, 8),
        "planned": fit("planned", DistNormSync(per_worker_batch_size=8), 3, 8),
        "first": fit(
            "first", DistNormSync(per_worker_batch_size=2), 3, 2,
            as_callback=True, save_to=checkpoint,
        ),
        "resumed": fit(
            "resumed", DistNormSync(per_worker_batch_size=2), 6, 2,
            as_callback=True, ckpt_path=checkpoint,
        ),
    }  # fmt: skip
    rank = results["control"]["rank"]
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    main(Path(sys.argv[1]))
