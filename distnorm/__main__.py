"""distnorm's command line: ``python -m distnorm plan MODEL --per-worker-batch B ...``.

``plan`` prints the normalization plan for a model without launching anything, so that a job's
normalization can be checked (or a policy tried) on a laptop for a 64-GPU run. MODEL is
``package.module:factory``, a callable taking no arguments that returns an
``nn.Module``: ``torchvision.models:resnet50``, ``timm.models:resnet50d``, or the
repository's ``distnorm.examples:small_resnet``. ``norms`` lists the normalizations
(``norm=`` names) and their properties, from the registry :data:`distnorm.NORMS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import torch
from torch import nn

from distnorm.errors import DistNormError
from distnorm.norms import NORMS
from distnorm.policy import available_policies, plan
from distnorm.table import format_table


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a refused request)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "norms":
        sys.stdout.write(_norms_table() + "\n")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        model = _load_model(args.model)
        sample = None
        if args.input_shape is not None:
            sample = torch.zeros(1, *args.input_shape)
        result = plan(
            model,
            args.per_worker_batch,
            args.world_size,
            accumulation_steps=args.accumulation_steps,
            ranks_per_node=args.ranks_per_node,
            pretrained=args.pretrained,
            policy=args.policy,
            sample_input=sample,
        )
    except DistNormError as error:
        parser.exit(2, f"distnorm plan: error: {error}\n")
    sys.stdout.write((result.to_json() if args.json else str(result)) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distnorm", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "norms",
        help="list the normalizations and their properties",
        description="List the norm= names distnorm knows, with their layers and properties.",
    )
    plan_parser = commands.add_parser(
        "plan",
        help="print the normalization plan for a model",
        description="Print which normalization each layer of MODEL would get, and why.",
    )
    plan_parser.add_argument("model", metavar="MODEL", help="package.module:factory")
    plan_parser.add_argument(
        "--per-worker-batch",
        required=True,
        type=_batch,
        metavar="B|CONFIG",
        help="samples per rank per step, or a DeepSpeed/Accelerate config file to read it from",
    )
    plan_parser.add_argument(
        "--world-size",
        type=_positive,
        help="ranks in the job (default: from the launcher's environment, else 1)",
    )
    plan_parser.add_argument(
        "--ranks-per-node",
        type=_positive,
        help="ranks on each node (default: from the launcher's environment, else unknown)",
    )
    plan_parser.add_argument(
        "--accumulation-steps",
        type=_positive,
        metavar="K",
        help="micro-batches per optimizer step under gradient accumulation (default: the "
        "config's gradient_accumulation_steps when B is a config, else 1)",
    )
    plan_parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tuning a BatchNorm-pretrained model (default: the policy's setting)",
    )
    plan_parser.add_argument(
        "--policy",
        default="default",
        metavar="NAME|PATH",
        help=f"a shipped policy ({', '.join(available_policies())}) or a YAML file",
    )
    plan_parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="one sample's shape, to measure the values each statistic sees",
    )
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _norms_table() -> str:
    """The registry as a table: one row per normalization."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "-"

    rows = [
        (
            norm.name,
            norm.label,
            "unchanged" if norm.layer is None else norm.layer.__name__,
            yes(norm.synchronizes),
            yes(norm.grouped),
            yes(norm.accumulates),
            "yes" if norm.ws_default else "when accumulating" if norm.accumulates else "-",
            yes(norm.forceable),
        )
        for norm in NORMS.values()
    ]
    header = ("norm=", "label", "layer", "syncs", "groups", "accumulates", "WS", "forceable")
    return format_table(header, rows)


def _load_model(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise DistNormError(
            f"MODEL must be package.module:factory (e.g. distnorm.examples:small_resnet), "
            f"got {spec!r}"
        )
    try:
        factory = importlib.import_module(module_name)
    except ImportError as error:
        raise DistNormError(f"cannot import {module_name!r} for MODEL {spec!r}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise DistNormError(f"{module_name!r} has no attribute {attribute!r} (MODEL {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise DistNormError(f"MODEL {spec!r} is not callable")
    try:
        model = factory()
    except Exception as error:
        raise DistNormError(
            f"calling MODEL {spec!r} with no arguments failed: {type(error).__name__}: {error}; "
            "give a factory that needs no arguments"
        ) from error
    if not isinstance(model, nn.Module):
        raise DistNormError(
            f"MODEL {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch(text: str) -> int | str:
    """An integer batch size, or (anything else) the path of a config to read it from."""
    return _positive(text) if text.lstrip("+-").isdigit() else text


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes such as 3,224,224, got {text!r}"
        ) from None
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


if __name__ == "__main__":
    sys.exit(main())
