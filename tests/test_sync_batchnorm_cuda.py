"""The synchronized layers on CUDA: every norm in fp32 and bf16, contiguous and channels-last,
against the float64 references of the CPU tests, on one GPU and on two ranks sharing it
(CUDA tensors over gloo: NCCL refuses two ranks on one device); a steady training step
with no host synchronization (``torch.cuda.set_sync_debug_mode("error")``); a captured
CUDA graph of a training step that replays as eager; and torch.nn.SyncBatchNorm itself
over NCCL when there are two GPUs. Every test here skips cleanly without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from tests import test_batch_channel_norm_distributed as bcn_tests
from tests import test_batch_group_norm_distributed as bgn_tests
from tests import test_sync_batchnorm_distributed as sync_tests
from tests.multiprocess import run_on_ranks

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL puts one rank on each)"
)

SYNC_CASES = [
    sync_tests.Case((3, 0), "2d", "float64", device="cuda"),
    sync_tests.Case((2, 5), "2d", "float32", device="cuda"),
    sync_tests.Case((2, 5), "2d_channels_last", "float32", device="cuda"),
    sync_tests.Case((2, 5), "2d", "bfloat16", device="cuda"),
    sync_tests.Case((2, 5), "2d_channels_last", "bfloat16", device="cuda"),
    sync_tests.Case((1, 1), "0d", "float32", momentum=None, device="cuda"),
    sync_tests.Case((4, 3), "3d", "float32", device="cuda"),
    sync_tests.Case((4, 3), "2d", "float32", affine=False, device="cuda"),
]
BGN_CASES = [
    bgn_tests.Case((3, 0), "2d", 2, device="cuda"),
    bgn_tests.Case((2, 5), "2d", 3, dtype="bfloat16", device="cuda"),
    bgn_tests.Case((2, 5), "2d", 3, dtype="bfloat16", channels_last=True, device="cuda"),
    bgn_tests.Case((1, 1), "1d", 2, affine=False, device="cuda"),
    bgn_tests.Case((2, 5), "2d", bgn_tests.CHANNELS, device="cuda"),
]
BCN_CASES = [
    bcn_tests.Case((2, 5), mode, layout, dtype, device="cuda")
    for mode in bcn_tests.MODES
    for layout, dtype in (("2d", "float64"), ("2d", "float32"), ("2d_channels_last", "float32"))
] + [bcn_tests.Case((2, 5), "estimated", "2d_channels_last", "bfloat16", device="cuda")]


def every_case_worker(rank: int, world_size: int) -> dict:
    return {
        "sync_bn": sync_tests.all_cases_worker(rank, world_size, SYNC_CASES),
        "bgn": bgn_tests.all_cases_worker(rank, world_size, BGN_CASES),
        "bcn": {case.id: bcn_tests.run_case_on_rank(case, rank) for case in BCN_CASES},
    }


@needs_cuda
def test_every_norm_on_two_ranks_sharing_a_gpu_matches_the_float64_reference() -> None:
    per_rank = run_on_ranks(every_case_worker, 2)
    for case in SYNC_CASES:
        results = [rank["sync_bn"][case.id] for rank in per_rank]
        sync_tests.assert_matches_reference(case, results, sync_tests.reference_steps(case))
    for case in BGN_CASES:
        results = [rank["bgn"][case.id] for rank in per_rank]
        bgn_tests.assert_matches_reference(case, results, bgn_tests.reference(case))
    for case in BCN_CASES:
        results = [rank["bcn"][case.id] for rank in per_rank]
        bcn_tests.assert_matches_reference(case, results, bcn_tests.reference_steps(case))


def one_gpu_layers() -> dict[str, nn.Module]:
    """Layers whose single-process training runs distnorm's own synchronized path (over
    this rank alone) rather than torch's BatchNorm: BGN on channels-last inputs, and BCN's
    micro-batch mode."""
    torch.manual_seed(0)
    return {
        "bgn": distnorm.BatchGroupNorm(32, 8),
        "bcn": distnorm.BatchChannelNorm(32, num_groups=8),
    }


def channels_last_batch(dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, 7, 7, generator=generator, dtype=torch.float64) * 2 + 1
    return x.to(device, dtype).contiguous(memory_format=torch.channels_last)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_gpu_synchronized_paths_match_the_cpu_in_float64(dtype: torch.dtype) -> None:
    """The CUDA kernels (torch's SyncBN kernels and BatchNorm kernels) against the same
    layer in float64 on the CPU, over three training steps and an eval step."""
    tolerance = 1e-4 if dtype == torch.float32 else 4 * 2**-8
    for name, reference in one_gpu_layers().items():
        layer = one_gpu_layers()[name].cuda()
        reference = reference.double()
        for step in range(4):
            layer.train(step < 3)
            reference.train(step < 3)
            x = channels_last_batch(dtype, step, "cuda").requires_grad_(True)
            x64 = x.detach().double().cpu().requires_grad_(True)
            y, y64 = layer(x), reference(x64)
            grad = torch.ones_like(y64).normal_(generator=torch.Generator().manual_seed(step))
            y.backward(grad.to(x.device, dtype))
            y64.backward(grad)
            scale = max(1.0, float(y64.detach().abs().max()))
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(y.double().cpu(), y64, rtol=0, atol=tolerance * scale)
            scale = max(1.0, float(x64.grad.abs().max()))
            torch.testing.assert_close(
                x.grad.double().cpu(), x64.grad, rtol=0, atol=tolerance * scale, msg=name
            )
        for buffer in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(layer, buffer).double().cpu(), getattr(reference, buffer),
                rtol=1e-4, atol=1e-5, msg=f"{name} {buffer}",
            )  # fmt: skip


@needs_cuda
def test_a_steady_step_makes_no_host_synchronization() -> None:
    """With every check on (the defaults), a training step after the first ones neither
    synchronizes the device nor reads it: torch raises at any synchronizing call."""
    model = nn.Sequential(*one_gpu_layers().values()).cuda()
    batches = [channels_last_batch(torch.float32, step, "cuda") for step in range(6)]
    for x in batches[:3]:  # the first calls agree on a shift and read the host: not steady
        model(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches[3:]:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    distnorm.report()  # nothing to report; and it reads the host outside the steady steps


@needs_cuda
def test_a_captured_training_step_replays_like_eager() -> None:
    """CUDA graphs: the layers' state (shift, flags, running statistics) lives in tensors
    updated in place, so replaying a captured step equals running it eagerly."""
    eager, captured = (nn.Sequential(*one_gpu_layers().values()).cuda() for _ in range(2))
    static_x = channels_last_batch(torch.float32, 0, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up, as torch.cuda.graph requires, on both copies
        for step in range(3):
            for model in (eager, captured):
                model.zero_grad(set_to_none=True)
                model(channels_last_batch(torch.float32, step, "cuda")).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    captured.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = captured(static_x)
        static_y.sum().backward()
    for step in range(3, 6):
        x = channels_last_batch(torch.float32, step, "cuda")
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y = eager(x)
        y.sum().backward()
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
    for (name, buffer), expected in zip(captured.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5, msg=name)
    for parameter, expected in zip(captured.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-5)
    distnorm.report()


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
