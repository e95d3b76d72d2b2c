"""How launch/train.py wraps a converted model: DistributedDataParallel, Accelerate or
DeepSpeed, behind one small interface so that the training loop is the same for all three.

Copy the class of the engine you use. Each one

* wraps the model *after* ``distnorm.convert_model`` (conversion must see the plain
  BatchNorms, and the wrapper must see the converted layers' parameters);
* runs one optimization step (``step``): backward, optimizer, learning-rate schedule;
* reports the number of data-parallel processes *it* sees (``world_size``), which
  train.py checks against the process group: a launcher flag that quietly starts one
  non-distributed process, or an Accelerator that does not recognize the job, would
  otherwise train each rank on its own without an error;
* gives and takes the optimizer's state in ``torch.optim`` form (``optimizer_state``,
  ``load_optimizer_state``), whole on every rank, so that a checkpoint written under one
  engine resumes under another. Under DeepSpeed ZeRO 1-2 each rank holds only its
  partition; the state is gathered on save and split again on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distnorm.distributed import DistributedContext


class DDPEngine:
    """torch's DistributedDataParallel (torchrun, mpirun, srun); the bare model on one
    process."""

    name = "ddp"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        ctx: DistributedContext,
    ) -> None:
        self.device = ctx.device
        model.to(self.device)
        if ctx.is_distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.module: nn.Module = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.module = model
        self.world_size = ctx.world_size if ctx.is_distributed else 1
        self.optimizer, self.schedule = optimizer, schedule

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class AccelerateEngine:
    """Hugging Face Accelerate: ``Accelerator.prepare`` on the model and optimizer.

    The DataLoader keeps its DistributedSampler rather than going through ``prepare``
    (which would shard it a second time), so every engine sees the same samples; and the
    schedule is stepped here once per step (a prepared scheduler steps once per process,
    for schedules counted in single-process steps).
    """

    name = "accelerate"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        ctx: DistributedContext,
    ) -> None:
        from accelerate import Accelerator

        # cpu= must be explicit without a GPU: an Accelerator that finds neither a GPU nor
        # ACCELERATE_USE_CPU=1 takes a torchrun-started job for a single process.
        self.accelerator = Accelerator(cpu=ctx.device.type == "cpu")
        self.module, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.schedule = schedule

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def step(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine:
    """DeepSpeed: ``deepspeed.initialize`` with a JSON config (ZeRO stages 0-2 here).

    The optimizer state moves in and out of ZeRO 1-2's partitions with DeepSpeed's
    ``safe_get/set_full_optimizer_state``; the configs here train in fp32 (with fp16/bf16,
    stage 0 wraps the optimizer and its state_dict is DeepSpeed's own).

    DeepSpeed broadcasts parameters once, at initialization, and never buffers: the
    running statistics of a *local* BatchNorm drift apart across ranks, and rank 0's are
    the ones a checkpoint keeps. Converted (synchronized) layers update theirs from the
    same global statistics on every rank, so they stay identical without a broadcast.
    """

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        ctx: DistributedContext,
        config: str,
    ) -> None:
        import deepspeed

        self.params = list(model.parameters())
        self.template = optimizer.state_dict()  # hyperparameters and parameter indices
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
        )
        self.zero_stage = self.engine.zero_optimization_stage()
        self.device = self.engine.device
        self.world_size = self.engine.dp_world_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # optimizer, zero_grad and the schedule given to initialize

    def optimizer_state(self) -> dict[str, Any]:
        if self.zero_stage == 0:
            return self.optimizer.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        keys = self._partition_state_keys()
        state = {
            index: {  # gathering is a collective: every rank asks for every parameter
                key: safe_get_full_optimizer_state(param, key).detach().cpu() for key in keys
            }
            for index, param in enumerate(self.params)
        }
        groups = [
            {**saved, **{k: v for k, v in live.items() if k != "params"}}
            for saved, live in zip(
                self.template["param_groups"], self.optimizer.param_groups, strict=True
            )
        ]
        return {"state": {i: s for i, s in state.items() if s}, "param_groups": groups}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.zero_stage == 0:
            self.optimizer.load_state_dict(state)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        for live, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            live.update({k: v for k, v in saved.items() if k != "params"})
        keys = sorted({key for param_state in state["state"].values() for key in param_state})
        if not keys:
            return
        # ZeRO creates its partitions' optimizer state at the first step; create it now,
        # as zeros, so that the saved state can be written into each rank's partition.
        # (DeepSpeed's ZeRO 1-2 optimizer internals, as of DeepSpeed 0.19.)
        zero = self.optimizer
        for partition in zero.single_partition_of_fp32_groups:
            for key in keys:
                zero.optimizer.state[partition][key] = torch.zeros_like(partition)
        zero._lazy_init_hp_params_optimizer_state()
        for index, param in enumerate(self.params):
            for key, value in state["state"].get(index, {}).items():
                safe_set_full_optimizer_state(param, value.to(param.device), key)

    def _partition_state_keys(self) -> list[str]:
        """The optimizer's per-parameter tensor states (SGD: momentum_buffer; Adam:
        exp_avg, exp_avg_sq), the same on every rank; none before the first step."""
        zero = self.optimizer
        partition = zero.single_partition_of_fp32_groups[0]
        return sorted(
            key
            for key, value in zero.optimizer.state.get(partition, {}).items()
            if torch.is_tensor(value) and value.shape == partition.shape
        )
