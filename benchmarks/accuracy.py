"""Accuracy versus per-worker batch: the Group Normalization paper's Figure 1 in miniature.

Wu & He (2018, "Group Normalization", Fig. 1) train ResNet-50 on ImageNet with BatchNorm
at 32, 16, 8, 4 and 2 images per worker: BN's error grows as the batch shrinks, GN's stays.
Here, 4 real processes (gloo) train a small CNN with per-worker batch 1, 2, 4, 8 and 32 and
each normalization: local BN (each worker's own statistics), distnorm SyncBN (the world's),
GN+WS, BCN, BGN (with WS, its default, and without), and what distnorm's default policy
chooses for that batch; several seeds. The regret table compares the policy with the best
fixed normalization at each batch, seed by seed. With gradient accumulation (issue: the
statistics of a step's micro-batches), "SyncBN + accumulation" pools each layer's statistics
over the world and the last k micro-batches, and "policy + accumulation" is what the policy
chooses when told the job accumulates k micro-batches (``accumulation_steps``), both with
the Weight Standardization they pair with by default, and without it ("no WS"); k is
``--accumulate-to`` images per worker over the per-worker batch, run at the per-worker
batches of ``--accumulation-batches`` only.

The data, "digits-M": scikit-learn's 1,797 8x8 digits (shipped with the package; nothing
is downloaded), upsampled to 12x12, placed at a random shift of up to 2 pixels in a 16x16
frame and blended into a patch of a natural photo as MNIST-M is made (Ganin & Lempitsky
2015, "Unsupervised Domain Adaptation by Backpropagation": |patch - digit| per colour
channel). The patches are random crops (16 to 32 pixels, resized) of the two photos that
ship with scikit-learn (``load_sample_images``). Plain digits are too uniform to show local
BN degrading at 2 images per worker; the photo backgrounds give each image statistics of
its own, as real images have, which is what makes a 2-image batch statistic a poor
estimate of the population's. 1,200 digits train (fresh shifts and backgrounds every
epoch), 597 test (one fixed rendering); stratified.

Every run takes the same optimizer steps: gradients are accumulated to --global-batch
images (128) per step whatever the per-worker batch, with the same SGD schedule, so the
runs differ only in which samples each normalization's statistics see (the micro-batch
setting of Qiao et al. 2019, arXiv:1903.10520). The GN paper instead scales the learning
rate with a global batch that shrinks with the per-worker batch; on a data set this small
that gives the small batches many times more optimizer steps within the same epochs, which
would be compared instead of the normalizations. Test accuracy is rank 0's model in eval
mode (running statistics; for local BN, rank 0's own).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distnorm
from benchmarks import common

NAME = "accuracy"
ACCUMULATING_NORMS = ["sync_bn_accum", "bn_accum", "sync_bn_accum_no_ws", "policy_accum"]
NORMS = ["bn", "sync_bn", "gn_ws", "bcn", "bgn", "bgn_no_ws", "policy", *ACCUMULATING_NORMS]
# What the default policy is compared with: the normalizations that see one micro-batch.
FIXED_NORMS = [n for n in NORMS if n != "policy" and n not in ACCUMULATING_NORMS]
FRAME, DIGIT, SHIFT = 16, 12, 2  # frame and digit side, largest shift (pixels)
TRAIN_DIGITS = 1200
# DDP's option not to broadcast buffers every forward (renamed in newer torch).
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


# --- Data --------------------------------------------------------------------------------


class DigitsM:
    """The digits-M data set (see the module docstring), rendered on demand.

    Backgrounds come from a bank of random photo crops made once (``bank`` of them for
    training, a separate quarter as many for the test set), so an epoch's rendering is a
    few tensor operations.
    """

    def __init__(self, bank: int = 4096) -> None:
        digits = load_digits()
        small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.digits = F.interpolate(small, size=(DIGIT, DIGIT), mode="bilinear").clamp(0, 1)[:, 0]
        self.labels = torch.tensor(digits.target)
        train, test = train_test_split(
            np.arange(len(self.labels)),
            train_size=TRAIN_DIGITS,
            stratify=digits.target,
            random_state=0,
        )
        self.train_index, self.test_index = torch.tensor(train), torch.tensor(test)
        photos = [
            torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) / 255.0
            for image in load_sample_images().images
        ]
        generator = torch.Generator().manual_seed(2015)
        self.train_backgrounds = photo_crops(photos, bank, generator)
        self.test_backgrounds = photo_crops(photos, max(bank // 4, 1), generator)
        self.test_images = self.render(
            self.test_index, self.test_backgrounds, torch.Generator().manual_seed(1234)
        )
        self.test_labels = self.labels[self.test_index]

    def render(
        self, index: torch.Tensor, backgrounds: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Images (n, 3, 16, 16) in [0, 1] of the digits ``index``, freshly shifted and
        blended into random backgrounds of the bank."""
        n = len(index)
        offsets = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=generator)
        rows = (offsets[0][:, None] + torch.arange(DIGIT))[:, :, None]
        cols = (offsets[1][:, None] + torch.arange(DIGIT))[:, None, :]
        frames = torch.zeros(n, FRAME, FRAME)
        frames[torch.arange(n)[:, None, None], rows, cols] = self.digits[index]
        chosen = backgrounds[torch.randint(0, len(backgrounds), (n,), generator=generator)]
        return (chosen - frames[:, None]).abs()


def photo_crops(photos: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` square crops of 16 to 32 pixels of random photos, resized to 16x16."""
    crops = torch.empty(n, 3, FRAME, FRAME)
    for i in range(n):
        photo = photos[int(torch.randint(0, len(photos), (1,), generator=generator))]
        side = int(torch.randint(FRAME, 2 * FRAME + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=generator))
        crop = photo[None, :, top : top + side, left : left + side]
        crops[i] = F.interpolate(crop, size=(FRAME, FRAME), mode="bilinear", antialias=True)[0]
    return crops


# --- Model and training --------------------------------------------------------------------


def small_cnn(width: int = 16) -> nn.Sequential:
    """Four 3x3 conv-BN-ReLU layers (16x16 -> 2x2, `width` to 4 x `width` channels),
    global average pooling and a linear classifier."""
    layers: list[nn.Module] = []
    channels_in = 3
    for i, stride in enumerate((1, 2, 2, 2)):
        channels = width * 2 ** min(i, 2)
        layers += [
            nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        channels_in = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels_in, 10))


def train_runs(rank: int, world_size: int, report: common.Report, config: dict) -> None:
    """Train and test every run of ``config["runs"]`` in turn (the spawned worker)."""
    data = DigitsM(config["background_bank"])
    for run in config["runs"]:
        started = time.perf_counter()
        accuracy, loss = train_one(rank, world_size, report, data, run, config)
        if rank == 0:
            result = {
                "accuracy": accuracy,
                "final_loss": loss,
                "seconds": time.perf_counter() - started,
            }
            report(("done", run, result))


def train_one(
    rank: int,
    world_size: int,
    report: common.Report,
    data: DigitsM,
    run: dict,
    config: dict,
) -> tuple[float | None, float]:
    batch, seed = run["per_worker_batch"], run["seed"]
    accumulate = config["global_batch"] // (world_size * batch)
    torch.manual_seed(seed)
    model = common.normalize(
        small_cnn(config["width"]), run["norm"], batch, run.get("accumulation_steps", 1)
    )
    # Rank 0 is tested with its own running statistics: no buffer broadcast needed.
    trained = DistributedDataParallel(model, **NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD(
        model.parameters(), config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    # One epoch of linear warm-up from a tenth of the rate (Goyal et al. 2017), then cosine.
    steps_per_epoch = config["epoch_size"] // config["global_batch"]
    total_steps = steps_per_epoch * config["epochs"]
    warmup = max(1, min(steps_per_epoch, total_steps // 2))
    schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps - warmup)),
        ],
        [warmup],
    )
    per_rank = config["global_batch"] // world_size
    micro_steps, loss_sum = 0, 0.0
    for epoch in range(config["epochs"]):
        order = torch.randperm(
            TRAIN_DIGITS, generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        )
        mine = data.train_index[order[rank::world_size][: steps_per_epoch * per_rank]]
        generator = torch.Generator().manual_seed((seed * 1000 + epoch) * world_size + rank)
        images = data.render(mine, data.train_backgrounds, generator)
        labels = data.labels[mine]
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            for micro in range(accumulate):
                start = (step * accumulate + micro) * batch
                sync = micro == accumulate - 1
                with contextlib.nullcontext() if sync else trained.no_sync():
                    loss = F.cross_entropy(
                        trained(images[start : start + batch]), labels[start : start + batch]
                    )
                    (loss / accumulate).backward()
                loss_sum += loss.item() / accumulate
                micro_steps += 1
                if rank == 0 and micro_steps % 50 == 0:
                    report(("steps", 50))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    if rank == 0:
        report(("steps", micro_steps % 50))
    accuracy = None
    if rank == 0:
        model.eval()
        with torch.no_grad():
            predicted = model(data.test_images).argmax(dim=1)
        accuracy = 100.0 * (predicted == data.test_labels).float().mean().item()
    return accuracy, loss_sum / steps_per_epoch


# --- Planning the runs ---------------------------------------------------------------------


def policy_same_as(per_worker_batch: int, world_size: int, width: int) -> str | None:
    """The forced norm whose plan equals the default policy's plan for this per-worker
    batch, layer for layer; None when the policy mixes norms. Such a policy run would
    repeat that forced run exactly, so its result is reused. (The forced runs synchronize
    SyncBN, BCN and BGN over the world, as ``convert_model(norm=...)`` does.)"""

    def decisions(policy: Any = None) -> list[tuple]:
        plan = distnorm.plan(
            small_cnn(width), per_worker_batch, world_size=world_size, policy=policy
        )
        return [(lp.norm, lp.sync_group_size, lp.num_groups) for lp in plan.layers]

    chosen = decisions()
    world = world_size if world_size > 1 else None
    forced = {
        "bn": "bn",
        "sync_bn": "sync_bn",
        "gn_ws": "gn_ws",
        "bcn": {"norm": "bcn", "sync_group_size": world},
        "bgn": {"norm": "bgn", "sync_group_size": world},
    }
    for norm, override in forced.items():
        if decisions({"overrides": {"by_type": {"BatchNorm2d": override}}}) == chosen:
            return norm
    return None


def accumulated_policy(
    per_worker_batch: int, world_size: int, width: int, steps: int
) -> tuple[str, str | None]:
    """What the policy chooses when told of ``steps`` micro-batches per step: in a few
    words, for its first layer (e.g. "sync_bn g2 k16"), and the forced accumulating run
    whose conversion equals it, layer for layer ("sync_bn_accum": SyncBN over the world;
    "bn_accum": over each worker alone), or None."""
    plan = distnorm.plan(
        small_cnn(width), per_worker_batch, world_size=world_size, accumulation_steps=steps
    )
    first = plan.layers[0]
    group = "" if first.sync_group_size is None else f" g{first.sync_group_size}"
    chosen = {(lp.norm, lp.sync_group_size, lp.accumulation_steps) for lp in plan.layers}
    forced = {("sync_bn", world_size, steps): "sync_bn_accum", ("sync_bn", 1, steps): "bn_accum"}
    alias = forced.get(chosen.pop()) if len(chosen) == 1 else None
    return f"{first.norm}{group} k{first.accumulation_steps}", alias


def accumulation_steps(args: Any, batch: int) -> int:
    """k for the accumulating runs at ``batch`` images per worker: ``--accumulate-to / b``,
    which must divide the micro-batches of an optimizer step (the weights are fixed over
    the window)."""
    steps, remainder = divmod(args.accumulate_to, batch)
    micro_batches = args.global_batch // (args.world_size * batch)
    if remainder or micro_batches % steps:
        raise SystemExit(
            f"--accumulate-to {args.accumulate_to} at per-worker batch {batch}: k = "
            f"{args.accumulate_to}/{batch} must be an integer dividing the {micro_batches} "
            "micro-batches of an optimizer step"
        )
    return steps


def run(args: Any) -> list[dict[str, Any]]:
    if not args.global_batch <= args.epoch_size <= TRAIN_DIGITS:
        raise SystemExit(f"--epoch-size must lie between --global-batch and {TRAIN_DIGITS}")
    for batch in args.per_worker_batch:
        if args.global_batch % (args.world_size * batch):
            raise SystemExit(
                f"--global-batch {args.global_batch} is not a multiple of world size x "
                f"per-worker batch = {args.world_size * batch}"
            )
    accumulating = {
        b: accumulation_steps(args, b)
        for b in args.per_worker_batch
        if b in args.accumulation_batches and any(n in ACCUMULATING_NORMS for n in args.norms)
    }
    settings = {
        k: getattr(args, k)
        for k in (
            "world_size",
            "epochs",
            "global_batch",
            "lr",
            "weight_decay",
            "epoch_size",
            "width",
            "background_bank",
        )
    }
    cache = common.Cache(args.out, NAME, args.fresh)
    aliases = {
        b: policy_same_as(b, args.world_size, args.width)
        for b in args.per_worker_batch
        if "policy" in args.norms
    }
    accumulated = {
        b: accumulated_policy(b, args.world_size, args.width, steps)
        for b, steps in accumulating.items()
        if "policy_accum" in args.norms
    }

    def trained_as(r: dict[str, Any]) -> dict[str, Any]:
        """The run whose training gives ``r``'s result: a policy run that repeats a
        forced one is that one."""
        alias = None
        if r["norm"] == "policy":
            alias = aliases[r["per_worker_batch"]]
        elif r["norm"] == "policy_accum":
            alias = accumulated[r["per_worker_batch"]][1]
        return r if alias is None else {**r, "norm": alias}

    planned = [
        {"norm": norm, "per_worker_batch": b, "seed": seed}
        | ({"accumulation_steps": accumulating[b]} if norm in ACCUMULATING_NORMS else {})
        for seed in args.seeds
        for b in args.per_worker_batch
        for norm in args.norms
        if norm not in ACCUMULATING_NORMS or b in accumulating
    ]
    todo = []
    for r in map(trained_as, planned):
        if r not in todo and {**settings, **r} not in cache:
            todo.append(r)
    micro_steps = sum(
        args.epochs
        * (args.epoch_size // args.global_batch)
        * args.global_batch
        // (args.world_size * r["per_worker_batch"])
        for r in todo
    )
    if todo:
        with common.progress(micro_steps, "accuracy runs", "micro-step") as bar:

            def on_report(_rank: int, message: tuple) -> None:
                if message[0] == "steps":
                    bar.update(message[1])
                else:
                    _, finished, result = message
                    cache.put({**settings, **finished}, result)
                    bar.set_postfix_str(
                        f"last: {finished['norm']} b={finished['per_worker_batch']} "
                        f"seed {finished['seed']}: {result['accuracy']:.1f}%"
                    )

            common.spawn(
                train_runs,
                args.world_size,
                {**settings, "runs": todo},
                threads=args.threads,
                on_report=on_report,
            )
    records = []
    for r in planned:
        record = {**settings, **r, **cache.get({**settings, **trained_as(r)})}
        if r["norm"] == "policy":
            record["policy_choice"] = aliases[r["per_worker_batch"]] or "mixed"
        elif r["norm"] == "policy_accum":
            record["policy_choice"] = accumulated[r["per_worker_batch"]][0]
        records.append(record)
    return records


# --- Results -------------------------------------------------------------------------------


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Mean and standard deviation over seeds per (norm, per-worker batch)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["norm"], r["per_worker_batch"]), []).append(r)
    return {
        key: {
            "mean": float(np.mean([r["accuracy"] for r in runs])),
            "std": float(np.std([r["accuracy"] for r in runs])),
            "seeds": len(runs),
            "policy_choice": runs[0].get("policy_choice"),
            "accumulation_steps": runs[0].get("accumulation_steps", 1),
        }
        for key, runs in groups.items()
    }


def targets(stats: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """The issues' checks at per-worker batch 2, against local BN at 32: the policy's
    choice, local BN, and the accumulating runs (target: within 0.5 points)."""
    reference = stats.get(("bn", 32))
    if reference is None:
        return {}
    goals: dict[str, Any] = {"bn_at_32": reference["mean"]}
    for norm in ("policy", "bn", *ACCUMULATING_NORMS):
        if (norm, 2) in stats:
            goals[f"{norm}_at_2"] = stats[(norm, 2)]["mean"]
            goals[f"{norm}_at_2_minus_bn_at_32"] = stats[(norm, 2)]["mean"] - reference["mean"]
    if ("policy", 2) in stats:
        goals["policy_choice_at_2"] = stats[("policy", 2)]["policy_choice"]
    return goals


def regret(records: list[dict[str, Any]], stats: dict) -> list[dict[str, Any]]:
    """Per per-worker batch: the best fixed normalization (highest mean), and the policy's
    accuracy minus it, seed by seed (mean and standard deviation of those differences);
    ``within_one_std`` when the policy is not worse by more than one of them."""
    by_run = {(r["norm"], r["per_worker_batch"], r["seed"]): r["accuracy"] for r in records}
    rows = []
    for batch in sorted({b for n, b in stats if n == "policy"}, reverse=True):
        fixed = [n for n in FIXED_NORMS if (n, batch) in stats]
        if not fixed:
            continue
        best = max(fixed, key=lambda n: stats[(n, batch)]["mean"])
        seeds = sorted(s for n, b, s in by_run if (n, b) == ("policy", batch))
        differences = [by_run[("policy", batch, s)] - by_run[(best, batch, s)] for s in seeds]
        mean, std = float(np.mean(differences)), float(np.std(differences))
        rows.append(
            {
                "per_worker_batch": batch,
                "policy_choice": stats[("policy", batch)]["policy_choice"],
                "best": best,
                "best_mean": stats[(best, batch)]["mean"],
                "policy_mean": stats[("policy", batch)]["mean"],
                "regret": mean,
                "regret_std": std,
                "seeds": len(seeds),
                "within_one_std": mean >= -std or mean == 0.0,
            }
        )
    return rows


def tables(records: list[dict[str, Any]], stats: dict, goals: dict[str, Any], regrets: list) -> str:
    batches = sorted({b for _, b in stats}, reverse=True)
    norms = [n for n in NORMS if any(k[0] == n for k in stats)]

    def cell(norm: str, batch: int) -> str:
        s = stats.get((norm, batch))
        if s is None:
            return "-"
        policy = norm.startswith("policy") and s["policy_choice"]
        choice = f" ({s['policy_choice']})" if policy else ""
        if norm in ACCUMULATING_NORMS and not norm.startswith("policy"):
            choice = f" (k{s['accumulation_steps']})"
        return f"{s['mean']:.1f} ± {s['std']:.1f}{choice}"

    table = common.markdown_table(
        ["normalization", *[f"batch {b}" for b in batches]],
        [[common.NORM_LABELS[n], *[cell(n, b) for b in batches]] for n in norms],
    )
    first = records[0]
    text = (
        f"Test accuracy (%) on digits-M, mean ± std over {len({r['seed'] for r in records})} "
        f"seeds; {first['world_size']} processes, per-worker batch in the columns, "
        f"{first['epochs']} epochs at {first['global_batch']} images per optimizer step. "
        "The accumulating runs pool statistics over k micro-batches (in brackets: the "
        "policy's choice, g ranks and k).\n\n"
        f"{table}"
    )
    if regrets:
        text += (
            "\n\nRegret: the policy's accuracy minus the best fixed normalization's at each "
            "per-worker batch, seed by seed (mean ± std of the differences; 0 where the "
            "policy chose it). Target: never worse by more than one standard deviation.\n\n"
            + common.markdown_table(
                [
                    "per-worker batch",
                    "policy's choice",
                    "best fixed",
                    "regret (points)",
                    "within 1 std",
                ],
                [
                    [
                        r["per_worker_batch"],
                        r["policy_choice"],
                        f"{common.NORM_LABELS[r['best']]} ({r['best_mean']:.1f})",
                        f"{r['regret']:+.1f} ± {r['regret_std']:.1f}",
                        "yes" if r["within_one_std"] else "**no**",
                    ]
                    for r in regrets
                ],
            )  # fmt: skip
        )
    compared = [n for n in ("policy", "bn", *ACCUMULATING_NORMS) if f"{n}_at_2" in goals]
    if compared:
        text += (
            f"\n\nAt per-worker batch 2 against local BN at 32 ({goals['bn_at_32']:.1f}%): "
            + ", ".join(
                f"{common.NORM_LABELS[n]} {goals[f'{n}_at_2_minus_bn_at_32']:+.1f} points"
                for n in compared
            )
            + "."
        )
    return text


def figure(stats: dict[tuple[str, int], dict[str, Any]], world_size: int) -> Any:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    norms = [n for n in NORMS if any(k[0] == n for k in stats)]
    for i, norm in enumerate(norms):
        points = sorted((b, s["mean"], s["std"]) for (n, b), s in stats.items() if n == norm)
        batches = [b * (1 + 0.03 * (i - len(norms) / 2)) for b, _, _ in points]  # dodge
        ax.errorbar(
            batches,
            [m for _, m, _ in points],
            yerr=[s for _, _, s in points],
            marker="o",
            capsize=3,
            linestyle="--" if norm.startswith("policy") else ":" if "no_ws" in norm else "-",
            color=plt.get_cmap("tab20")(i),  # more lines than the default cycle's 10 colours
            label=common.NORM_LABELS[norm],
        )
    reference = stats.get(("bn", 32))
    if reference is not None:
        ax.axhspan(reference["mean"] - 1, reference["mean"] + 1, color="grey", alpha=0.15)
        ax.axhline(
            reference["mean"], color="grey", linewidth=0.8, label="local BN at 32, ± 1 point"
        )
    ax.set_xscale("log", base=2)
    batches = sorted({b for _, b in stats})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.invert_xaxis()
    ax.set_xlabel("images per worker")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Accuracy versus per-worker batch (digits-M, {world_size} processes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument(
        "--per-worker-batch", type=int, nargs="+", default=[1, 2, 4, 8, 32], help="images"
    )
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=NORMS, help="compared")
    parser.add_argument(
        "--accumulate-to",
        type=int,
        default=32,
        help="images per worker the accumulating runs pool statistics over",
    )
    parser.add_argument(
        "--accumulation-batches",
        type=int,
        nargs="+",
        default=[1, 2],
        help="per-worker batches at which the accumulating runs are made",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run each")
    parser.add_argument("--world-size", type=int, default=4, help="processes (gloo)")
    parser.add_argument("--epochs", type=int, default=24, help="passes over --epoch-size")
    parser.add_argument("--global-batch", type=int, default=128, help="images per SGD step")
    parser.add_argument(
        "--epoch-size",
        type=int,
        default=TRAIN_DIGITS,
        help="training images per epoch, a random subset of the 1,200 training digits",
    )
    parser.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (peak)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--width", type=int, default=16, help="the CNN's first-layer channels")
    parser.add_argument("--background-bank", type=int, default=4096, help="photo crops made")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = common.parse_arguments(
        parser,
        argv,
        tiny={
            "per_worker_batch": [2, 4],
            "seeds": [0],
            "world_size": 2,
            "epochs": 1,
            "global_batch": 16,
            "epoch_size": 32,
            "width": 4,
            "background_bank": 16,
            "accumulate_to": 4,
        },
    )
    records = run(args)
    stats = aggregate(records)
    goals = targets(stats)
    regrets = regret(records, stats)
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="Accuracy versus per-worker batch size",
        records=records,
        summary={
            "by_norm_and_batch": [
                {"norm": n, "per_worker_batch": b, **s} for (n, b), s in stats.items()
            ],
            "targets": goals,
            "regret": regrets,
        },
        tables=tables(records, stats, goals, regrets),
        figure=figure(stats, args.world_size),
    )
    return {
        "records": records, "stats": stats, "targets": goals, "regret": regrets, "paths": paths
    }  # fmt: skip


if __name__ == "__main__":
    main()
