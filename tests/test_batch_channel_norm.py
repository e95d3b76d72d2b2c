"""BatchChannelNorm in one process against a float64 implementation of Qiao et al.'s
Batch-Channel Normalization written here: the estimated batch part (update with the
batch's statistics about the old estimate, then normalize with the updated estimates, no
gradient through them), or BatchNorm in large-batch mode, then per-sample group
normalization with a per-group affine. Train (several steps, estimates checked) and eval
(estimates frozen), 0d/1d/2d/3d inputs, gradcheck, channels_last, bf16, bad input,
state_dict keys, conversion from a BatchNorm, and export to torch modules.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import nn

from distnorm.errors import InputError
from distnorm.layers.batch_channel_norm import BatchChannelNorm

CHANNELS = 8
GROUPS = 4
EPS = 1e-5
RATE = 0.25  # not the default, so that a layer ignoring estimate_rate fails
MOMENTUM = 0.2
STEPS = 3
SPATIAL = {"0d": (), "1d": (5,), "2d": (4, 3), "3d": (3, 2, 2)}
MODES = {"estimated": True, "batch": False}
PARAMETERS = ("weight", "bias", "group_weight", "group_bias")


# --- the paper's formula, float64, independent of the layer ------------------------------


def reference_bcn(
    x: torch.Tensor,
    state: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    *,
    estimated: bool,
    training: bool,
    groups: int = GROUPS,
    rate: float = RATE,
    momentum: float = MOMENTUM,
    eps: float = EPS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-Channel Normalization of ``x`` (N, C, *) with estimates / running statistics
    ``state`` ("mean", "var"); returns the output and the new state.

    Micro-batch (estimated): mu_hat += r (mean(x) - mu_hat), sigma_hat^2 += r (mean((x -
    mu_hat_old)^2) - sigma_hat^2), then x is normalized with the updated estimates, which
    are constants for autograd. Large-batch: BatchNorm (batch statistics in training,
    running ones updated with the unbiased variance; running statistics in eval). Then
    each sample's G groups of channels are standardized and get one affine pair per group.
    An empty batch changes no statistics."""
    channels = x.size(1)
    dims = [0, *range(2, x.dim())]
    shape = [1, channels] + [1] * (x.dim() - 2)
    mean, var = state["mean"], state["var"]
    if estimated:
        if training and x.numel() > 0:
            with torch.no_grad():
                batch_mean = x.mean(dim=dims)
                about_old_estimate = (x - mean.view(shape)).square().mean(dim=dims)
                mean = mean + rate * (batch_mean - mean)
                var = var + rate * (about_old_estimate - var)
        used_mean, used_var = mean, var
    elif training:
        used_mean = x.mean(dim=dims)
        used_var = (x - used_mean.view(shape)).square().mean(dim=dims)
        if x.numel() > 0:
            with torch.no_grad():
                count = x.numel() // channels
                unbiased = used_var * count / (count - 1)
                mean = (1 - momentum) * mean + momentum * used_mean
                var = (1 - momentum) * var + momentum * unbiased
    else:
        used_mean, used_var = mean, var
    z = (x - used_mean.view(shape)) / torch.sqrt(used_var.view(shape) + eps)
    z = z * params["weight"].view(shape) + params["bias"].view(shape)

    per_group = (x.numel() // max(x.size(0), 1)) // groups
    grouped = z.reshape(x.size(0), groups, per_group)
    group_mean = grouped.mean(dim=-1, keepdim=True)
    group_var = (grouped - group_mean).square().mean(dim=-1, keepdim=True)
    y = (grouped - group_mean) / torch.sqrt(group_var + eps)
    y = y * params["group_weight"].view(1, groups, 1) + params["group_bias"].view(1, groups, 1)
    return y.reshape(x.shape), {"mean": mean.detach(), "var": var.detach()}


def reference_step(
    x: torch.Tensor,
    grad: torch.Tensor | None,
    state: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    **kwargs,
) -> dict:
    """One reference forward (and backward with ``grad``): output, new state, gradients."""
    x = x.detach().double().requires_grad_(True)
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    y, new_state = reference_bcn(x, state, leaves, **kwargs)
    result = {"output": y.detach(), "state": new_state}
    if grad is not None:
        y.backward(grad.double())
        result["grad_input"] = x.grad
        result.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return result


# --- data ------------------------------------------------------------------------------


def step_data(key: str, step: int, batch: int, spatial: tuple[int, ...]) -> tuple:
    """Input and upstream gradient: channel means several standard deviations from the
    initial estimates, drifting from step to step, so that the estimates move visibly and
    normalizing with the old rather than the updated estimates gives another output."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{key}/{step}".encode()))
    shape = [1, CHANNELS] + [1] * len(spatial)
    scale = torch.linspace(0.5, 2.0, CHANNELS, dtype=torch.float64).view(shape)
    mean = torch.linspace(-4.0, 5.0, CHANNELS, dtype=torch.float64).view(shape)
    x = torch.randn(batch, CHANNELS, *spatial, generator=generator, dtype=torch.float64)
    x = x * scale + mean * (1 + 0.25 * step)
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x, grad


def initial_parameters() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)

    def around(centre: float, size: int) -> torch.Tensor:
        return centre + 0.2 * torch.randn(size, generator=generator, dtype=torch.float64)

    return {
        "weight": around(1.0, CHANNELS),
        "bias": around(0.0, CHANNELS),
        "group_weight": around(1.0, GROUPS),
        "group_bias": around(0.0, GROUPS),
    }


def initial_state() -> dict[str, torch.Tensor]:
    """Estimates away from (0, 1), as after converting a trained BatchNorm."""
    generator = torch.Generator().manual_seed(11)
    return {
        "mean": 0.5 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64),
        "var": 0.5 + torch.rand(CHANNELS, generator=generator, dtype=torch.float64),
    }


def make_layer(
    estimated: bool, dtype: torch.dtype = torch.float64, process_group: object = None
) -> BatchChannelNorm:
    layer = BatchChannelNorm(
        CHANNELS, num_groups=GROUPS, eps=EPS, momentum=MOMENTUM, estimate_rate=RATE,
        estimated=estimated, process_group=process_group,
    ).to(dtype)  # fmt: skip
    state, params = initial_state(), initial_parameters()
    with torch.no_grad():
        layer.running_mean.copy_(state["mean"])
        layer.running_var.copy_(state["var"])
        for name, value in params.items():
            getattr(layer, name).copy_(value)
    return layer


def run_layer(layer: BatchChannelNorm, x: torch.Tensor, grad: torch.Tensor | None) -> dict:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    result = {"output": y.detach()}
    if grad is not None:
        y.backward(grad.to(y.dtype))
        result["grad_input"] = x.grad
        result.update({f"grad_{k}": getattr(layer, k).grad for k in PARAMETERS})
    return result


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=what)


# --- the formula, train and eval --------------------------------------------------------


@pytest.mark.parametrize("spatial", list(SPATIAL))
@pytest.mark.parametrize("mode", list(MODES))
def test_train_and_eval_match_the_paper_formula(mode: str, spatial: str) -> None:
    estimated = MODES[mode]
    layer = make_layer(estimated)
    state, params = initial_state(), initial_parameters()
    for step in range(STEPS):
        x, grad = step_data(f"{mode}/{spatial}", step, 3, SPATIAL[spatial])
        got = run_layer(layer, x, grad)
        expected = reference_step(x, grad, state, params, estimated=estimated, training=True)
        state = expected["state"]
        where = f"{mode}/{spatial} step {step}"
        for key in ("output", "grad_input", *(f"grad_{k}" for k in PARAMETERS)):
            assert_close64(got[key], expected[key], f"{where} {key}")
        assert_close64(layer.running_mean, state["mean"], f"{where} running_mean")
        assert_close64(layer.running_var, state["var"], f"{where} running_var")
        assert int(layer.num_batches_tracked) == step + 1

    layer.eval()
    frozen = (layer.running_mean.clone(), layer.running_var.clone())
    x, grad = step_data(f"{mode}/{spatial}", STEPS, 3, SPATIAL[spatial])
    got = run_layer(layer, x, grad)
    expected = reference_step(x, grad, state, params, estimated=estimated, training=False)
    for key in ("output", "grad_input", *(f"grad_{k}" for k in PARAMETERS)):
        assert_close64(got[key], expected[key], f"{mode}/{spatial} eval {key}")
    assert torch.equal(layer.running_mean, frozen[0]) and torch.equal(layer.running_var, frozen[1])
    assert int(layer.num_batches_tracked) == STEPS


def test_first_update_by_hand_old_centred_variance_then_updated_normalization() -> None:
    """From estimates (0, 1) one step gives mu_hat = r mean(x) and sigma_hat^2 = 1 + r
    (mean(x^2) - 1) (the squares about the OLD estimate 0), and the batch is normalized
    with these new estimates, not the old ones."""
    layer = BatchChannelNorm(CHANNELS, num_groups=GROUPS, estimate_rate=RATE).double()
    x, _ = step_data("by-hand", 0, 4, (3,))
    y = layer(x)
    dims = [0, 2]
    mu = RATE * x.mean(dim=dims)
    var = 1 + RATE * (x.square().mean(dim=dims) - 1)
    assert_close64(layer.running_mean, mu, "mu_hat")
    assert_close64(layer.running_var, var, "sigma_hat^2")

    def channel_part(z: torch.Tensor) -> torch.Tensor:
        grouped = z.reshape(4, GROUPS, -1)
        centred = grouped - grouped.mean(dim=-1, keepdim=True)
        return (centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + EPS)).view_as(z)

    with_new = channel_part((x - mu.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + EPS))
    with_old = channel_part(x / torch.sqrt(torch.tensor(1 + EPS, dtype=torch.float64)))
    assert_close64(y, with_new, "normalized with the updated estimates")
    assert not torch.allclose(y, with_old, atol=1e-3), "the data cannot tell old from new"


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck(mode: str, training: bool) -> None:
    """Input, weight, bias, group_weight and group_bias, except the input in micro-batch
    training: there the output depends on x through the estimates too, a path the paper
    gives no gradient (the estimates are "not updated by the gradients"), so finite
    differences and autograd differ by design. That input gradient is checked against the
    reference above, and equals the eval-mode gradient at the updated estimates, which is
    gradchecked here."""
    layer = make_layer(MODES[mode]).train(training)
    buffers = {name: buffer.clone() for name, buffer in layer.named_buffers()}

    def bcn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # Fresh copies of the estimates on every call: training updates them in place,
        # and gradcheck needs the same function each time it evaluates it.
        state = {name: buffer.clone() for name, buffer in buffers.items()}
        tensors = dict(zip(PARAMETERS, params, strict=True)) | state
        return torch.func.functional_call(layer, tensors, (x,))

    x, _ = step_data(f"gradcheck/{mode}", 0, 3, (2, 2))
    x.requires_grad_(not (MODES[mode] and training))
    params = [getattr(layer, name).detach().clone().requires_grad_(True) for name in PARAMETERS]
    assert torch.autograd.gradcheck(bcn, [x, *params])


def test_two_forwards_then_one_backward() -> None:
    """Gradient accumulation: the second forward updates the estimates in place before
    the first backward runs; the first step's gradient is still the first step's."""
    layer = make_layer(estimated=True)
    x1, g1 = step_data("accumulate", 0, 3, (4,))
    x2, g2 = step_data("accumulate", 1, 3, (4,))
    x1.requires_grad_(True)
    y1 = layer(x1)
    y2 = layer(x2)
    ((y1 * g1).sum() + (y2 * g2).sum()).backward()
    expected = reference_step(
        x1, g1, initial_state(), initial_parameters(), estimated=True, training=True
    )
    assert_close64(x1.grad, expected["grad_input"], "first step's input gradient")


# --- precision and memory format --------------------------------------------------------


@pytest.mark.parametrize("spatial", ["2d", "3d"])
@pytest.mark.parametrize("mode", list(MODES))
def test_channels_last_is_preserved(mode: str, spatial: str) -> None:
    layout = torch.channels_last if spatial == "2d" else torch.channels_last_3d
    x, grad = step_data(f"cl/{mode}", 0, 3, SPATIAL[spatial])
    x, grad = x.float(), grad.float()
    results = []
    for memory_format in (torch.contiguous_format, layout):
        layer = make_layer(MODES[mode], torch.float32)
        results.append(run_layer(layer, x.contiguous(memory_format=memory_format), grad))
    contiguous, channels_last = results
    assert channels_last["output"].is_contiguous(memory_format=layout)
    for key in ("output", "grad_input", "grad_group_weight"):
        torch.testing.assert_close(channels_last[key], contiguous[key], msg=key)


@pytest.mark.parametrize("mode", list(MODES))
def test_bfloat16_input_keeps_fp32_statistics(mode: str) -> None:
    estimated = MODES[mode]
    layer = make_layer(estimated, torch.float32)
    state, params = initial_state(), initial_parameters()
    for step in range(STEPS):
        x, grad = step_data(f"bf16/{mode}", step, 3, (4, 3))
        x, grad = x.bfloat16(), grad.bfloat16()
        got = run_layer(layer, x, grad)
        expected = reference_step(x, grad, state, params, estimated=estimated, training=True)
        state = expected["state"]
        assert got["output"].dtype == torch.bfloat16 and got["grad_input"].dtype == torch.bfloat16
        scale = float(expected["output"].abs().max())
        torch.testing.assert_close(
            got["output"].double(), expected["output"], rtol=0, atol=2e-2 * scale
        )
        # The estimates see the bf16 values exactly and are kept in fp32.
        for key, buffer in (("mean", layer.running_mean), ("var", layer.running_var)):
            assert buffer.dtype == torch.float32
            torch.testing.assert_close(
                buffer.double(), state[key], rtol=0, atol=1e-5 * float(state[key].abs().max())
            )


# --- bad input, construction, state ------------------------------------------------------


def test_bad_input_errors_name_the_layer_and_say_what_to_do() -> None:
    layer = BatchChannelNorm(CHANNELS, num_groups=GROUPS)
    layer._distnorm_name = "stem.1"  # as convert_model names it
    with pytest.raises(InputError, match=r"BatchChannelNorm 'stem\.1'.*\(N, C, \*\)"):
        layer(torch.randn(CHANNELS))
    with pytest.raises(InputError, match=r"'stem\.1' has 8 channels but its input has 6"):
        layer(torch.randn(2, 6, 3))
    with pytest.raises(InputError, match=r"'stem\.1'.*floating-point.*\.float\(\)"):
        layer(torch.ones(2, CHANNELS, 3, dtype=torch.long))
    with pytest.raises(InputError, match=r"num_groups=3 does not divide"):
        layer._init_channel_state(3)


def test_bad_construction_is_refused() -> None:
    with pytest.raises(InputError, match=r"BatchChannelNorm cannot split its 37 channels"):
        BatchChannelNorm(37)
    with pytest.raises(InputError, match=r"estimate_rate=1\.5.*\[0, 1\]"):
        BatchChannelNorm(CHANNELS, num_groups=GROUPS, estimate_rate=1.5)


def test_defaults_groups_and_rate() -> None:
    assert BatchChannelNorm(64).num_groups == 32
    assert BatchChannelNorm(48).num_groups == 24
    assert BatchChannelNorm(32).num_groups == 16  # never one channel per group
    layer = BatchChannelNorm(64)
    assert layer.estimated and layer.estimate_rate == 0.1 and layer.momentum == 0.1
    assert layer.group_weight.shape == layer.group_bias.shape == (32,)
    unaffine = BatchChannelNorm(64, affine=False)
    assert unaffine.group_weight is None and unaffine.weight is None
    unaffine(torch.randn(2, 64, 3))


def test_state_dict_extends_batchnorms() -> None:
    batchnorm = nn.BatchNorm2d(CHANNELS)
    batchnorm(torch.randn(4, CHANNELS, 3, 3) * 3 + 1)
    layer = BatchChannelNorm(CHANNELS, num_groups=GROUPS)
    assert set(layer.state_dict()) == set(batchnorm.state_dict()) | {"group_weight", "group_bias"}
    missing, unexpected = layer.load_state_dict(batchnorm.state_dict(), strict=False)
    assert sorted(missing) == ["group_bias", "group_weight"] and unexpected == []
    assert torch.equal(layer.running_mean, batchnorm.running_mean)


def reclassed(module: nn.Module) -> BatchChannelNorm:
    """What convert_model does: a BatchChannelNorm holding ``module``'s state, without
    its ``__init__``, then the init methods."""
    layer = object.__new__(BatchChannelNorm)
    layer.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    )
    layer._init_sync_state(None)
    layer._init_channel_state(GROUPS, RATE)
    return layer


def test_converted_batchnorm_starts_from_its_running_statistics() -> None:
    batchnorm = nn.BatchNorm1d(CHANNELS, momentum=MOMENTUM).double()
    state, params = initial_state(), initial_parameters()
    with torch.no_grad():
        batchnorm.running_mean.copy_(state["mean"])
        batchnorm.running_var.copy_(state["var"])
        batchnorm.weight.copy_(params["weight"])
        batchnorm.bias.copy_(params["bias"])
    layer = reclassed(batchnorm)
    assert layer.running_mean is batchnorm.running_mean and layer.weight is batchnorm.weight
    assert torch.equal(layer.group_weight, torch.ones(GROUPS, dtype=torch.float64))
    params |= {"group_weight": layer.group_weight.detach(), "group_bias": layer.group_bias.detach()}
    x, grad = step_data("converted", 0, 3, (5,))
    got = run_layer(layer, x, grad)
    expected = reference_step(x, grad, state, params, estimated=True, training=True)
    assert_close64(got["output"], expected["output"], "output")
    assert_close64(layer.running_mean, expected["state"]["mean"], "estimates")


def test_batchnorm_without_running_statistics_gets_fresh_estimates() -> None:
    layer = reclassed(nn.BatchNorm2d(CHANNELS, track_running_stats=False, affine=False))
    assert layer.track_running_stats and layer.group_weight is None
    assert torch.equal(layer.running_mean, torch.zeros(CHANNELS))
    assert torch.equal(layer.running_var, torch.ones(CHANNELS))
    layer(torch.randn(2, CHANNELS, 3, 3))
    assert int(layer.num_batches_tracked) == 1 and layer.running_mean.abs().sum() > 0


# --- micro-batch behaviour and export ------------------------------------------------------


def test_one_sample_without_spatial_dimensions_trains_in_micro_batch_mode() -> None:
    """One value per channel is all the estimated batch part needs (BatchNorm would
    refuse it), which is the point of micro-batch BCN."""
    layer = make_layer(estimated=True)
    x, grad = step_data("single", 0, 1, ())
    got = run_layer(layer, x, grad)
    expected = reference_step(
        x, grad, initial_state(), initial_parameters(), estimated=True, training=True
    )
    assert_close64(got["output"], expected["output"], "output")
    assert_close64(got["grad_input"], expected["grad_input"], "grad_input")


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_batch_counts_but_changes_no_statistics(mode: str) -> None:
    layer = make_layer(MODES[mode])
    before = (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(torch.empty(0, CHANNELS, 4, dtype=torch.float64))
    assert y.shape == (0, CHANNELS, 4)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("mode", list(MODES))
def test_to_torch_computes_the_same_eval_output_bit_for_bit(mode: str) -> None:
    layer = make_layer(MODES[mode], torch.float32)
    for step in range(2):
        layer(step_data(f"export/{mode}", step, 3, (4, 3))[0].float())
    layer.eval()
    exported = layer.to_torch(nn.BatchNorm2d)
    batchnorm, groupnorm = exported
    assert type(batchnorm) is nn.BatchNorm2d and type(groupnorm) is nn.GroupNorm
    assert batchnorm.weight is layer.weight and batchnorm.running_var is layer.running_var
    assert not exported.training
    x = step_data(f"export/{mode}", 2, 3, (4, 3))[0].float()
    assert torch.equal(exported(x), layer(x))
