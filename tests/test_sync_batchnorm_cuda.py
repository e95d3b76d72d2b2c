"""SyncBatchNorm on CUDA: the same float64 reference on one GPU (two ranks exchanging CUDA
tensors over gloo), and torch.nn.SyncBatchNorm itself over NCCL when there are two GPUs.
Every test here skips cleanly on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

import distnorm
from tests.multiprocess import run_on_ranks
from tests.test_sync_batchnorm_distributed import (
    Case,
    all_cases_worker,
    assert_matches_reference,
    reference_steps,
)

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL puts one rank on each)"
)

CUDA_CASES = [
    Case((3, 0), "2d", "float64", device="cuda"),
    Case((2, 5), "2d", "float32", device="cuda"),
    Case((2, 5), "2d_channels_last", "bfloat16", device="cuda"),
    Case((1, 1), "0d", "float32", momentum=None, device="cuda"),
    Case((4, 3), "3d", "float32", device="cuda"),
]


@needs_cuda
def test_cuda_tensors_match_single_process_reference() -> None:
    per_rank = run_on_ranks(all_cases_worker, 2, CUDA_CASES)
    for case in CUDA_CASES:
        assert_matches_reference(case, [r[case.id] for r in per_rank], reference_steps(case))


@needs_cuda
def test_one_gpu_without_process_group_is_torchs_batchnorm_bit_for_bit() -> None:
    x = torch.randn(8, 16, 10, 10, device="cuda").contiguous(memory_format=torch.channels_last)
    results = []
    for layer in (torch.nn.BatchNorm2d(16), distnorm.SyncBatchNorm(16)):
        layer = layer.cuda()
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.backward(torch.ones_like(out))
        results.append((out, inp.grad, layer.running_mean, layer.running_var))
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)


def against_torch_sync_batchnorm(rank: int, world_size: int) -> dict[str, float]:
    """Largest relative difference between distnorm's and torch's SyncBatchNorm."""
    torch.manual_seed(0)
    shapes = [(4, 32, 14, 14), (1, 32, 14, 14)]  # uneven per-rank batches
    x = torch.randn(shapes[rank], device="cuda") * 3 + 2
    grad = torch.randn(shapes[rank], device="cuda")
    outputs = {}
    for name, cls in (("ours", distnorm.SyncBatchNorm), ("torch", torch.nn.SyncBatchNorm)):
        layer = cls(32).cuda()
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.backward(grad)
        outputs[name] = [out, inp.grad, layer.weight.grad, layer.running_mean, layer.running_var]
    return {
        str(i): float(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).cpu())
        for i, (a, b) in enumerate(zip(outputs["ours"], outputs["torch"], strict=True))
    }


@needs_two_gpus
def test_matches_torch_sync_batchnorm_over_nccl() -> None:
    for differences in run_on_ranks(against_torch_sync_batchnorm, 2, backend="nccl"):
        assert max(differences.values()) < 1e-5, differences
