"""Smoke test of the benchmarks: each script's ``--tiny`` configuration runs (real spawned
gloo processes where the script spawns them) and writes JSON, markdown and PNG files that
parse. Nothing here times anything or asserts a speed; the counts of collectives are
checked because they are facts, not timings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import (
    accuracy,
    common,
    communication,
    dispatch,
    docs,
    gpu,
    layer_overhead,
    scaling,
)
from distnorm.examples import small_resnet
from tests.multiprocess import recorded_collectives, run_on_ranks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_outputs(paths: dict[str, Path], name: str, module: str | None = None) -> dict:
    """The three files exist and parse; returns the JSON payload."""
    assert set(paths) == {"json", "md", "png"}
    payload = json.loads(paths["json"].read_text())
    assert payload["benchmark"] == name
    assert payload["machine"]["torch"] and payload["machine"]["distnorm"]
    assert payload["command"].startswith(f"python -m benchmarks.{module or name}")
    assert payload["records"]
    markdown = paths["md"].read_text()
    assert markdown.startswith("### ") and "\n|:---|" in markdown
    assert f"]({name}.png)" in markdown
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    return payload


@pytest.mark.parametrize(
    "module", [layer_overhead, scaling, communication, accuracy, dispatch, gpu]
)
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "--tiny" in capsys.readouterr().out


def test_layer_overhead(tmp_path):
    result = layer_overhead.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "layer_overhead")
    measured = [r for r in payload["records"] if "ratio" in r]
    assert {(r["case"], r["dtype"]) for r in measured} == {
        (case, dtype) for case in layer_overhead.CASES for dtype in ("fp32", "bf16")
    }
    for r in measured:
        assert r["ratio"] == pytest.approx(r["distnorm_ms"] / r["baseline_ms"])


def test_dispatch(tmp_path):
    result = dispatch.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "dispatch")
    assert {(r["layer"], r["layout"]) for r in payload["records"]} == {
        (layer, layout) for layer in dispatch.LAYERS for layout in ("contiguous", "channels_last")
    }
    for r in payload["records"]:
        assert r["ops"] == sum(r["by_op"].values()) > 0 and r["host_reads"] == 0


def test_gpu_script_runs_on_cpu(tmp_path):
    """Its CUDA-only counts are left out on CPU; the rest is the code a GPU run executes."""
    result = gpu.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "gpu_sync", module="gpu")
    assert {r["section"] for r in payload["records"]} == {"one_device", "two_ranks"}
    assert payload["summary"]["bandwidth"]["layer_GBps"] > 0
    for r in payload["records"]:
        if r["section"] == "one_device":
            assert set(r["ratio"]) == set(gpu.ONE_DEVICE[1:])


def test_scaling(tmp_path):
    result = scaling.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "scaling")
    assert {(r["norm"], r["world_size"]) for r in payload["records"]} == {
        (n, w) for n in scaling.NORMS for w in (1, 2) if scaling.runs_at(n, w, "cpu")
    }
    # the collective floor exists only where there is someone to communicate with
    assert ("bn_collectives", 2) in {(r["norm"], r["world_size"]) for r in payload["records"]}
    for r in payload["records"]:
        assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 3
        if r["world_size"] == 1:
            assert r["efficiency"] == 1.0


def test_communication_counts_one_all_reduce_per_layer_each_way(tmp_path):
    result = communication.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "communication")
    sync = next(r for r in payload["records"] if r["norm"] == "sync_bn")
    assert sync["layers"] == 6  # small_resnet's BatchNorms
    for phase in ("forward", "backward"):
        assert sync["steady"][phase]["collectives"] == 6
        assert sync["steady"][phase]["kinds"] == ["all_reduce"]
    # the first step agrees on each layer's variance shift first: one more each
    assert sync["first"]["forward"]["collectives"] == 12
    bcn = next(r for r in payload["records"] if r["norm"] == "bcn")
    assert bcn["steady"]["backward"]["collectives"] == 0
    assert payload["summary"]["targets"]["one_all_reduce_per_layer_each_way"]
    assert len(communication.RESNET50_BN_CHANNELS) == 53
    projection = payload["summary"]["projection"]
    assert [r["world_size"] for r in projection] == communication.PROJECTED_WORLD_SIZES
    distnorm_bytes = {r["distnorm_bytes"] for r in projection}
    assert len(distnorm_bytes) == 1  # independent of the world size, unlike torch's scheme
    assert projection[-1]["torch_scheme_bytes"] > 100 * projection[0]["distnorm_bytes"]


def test_accuracy(tmp_path, monkeypatch):
    result = accuracy.main(["--tiny", "--out", str(tmp_path)])
    payload = check_outputs(result["paths"], "accuracy")
    records = payload["records"]
    # the accumulating runs only at the per-worker batches of --accumulation-batches (1, 2)
    assert {(r["norm"], r["per_worker_batch"]) for r in records} == {
        (n, b) for n in accuracy.NORMS for b in (2, 4) if n not in accuracy.ACCUMULATING_NORMS
    } | {(n, 2) for n in accuracy.ACCUMULATING_NORMS}
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in records)
    # tiny: --accumulate-to 4 at 2 images per worker, k = 2; 2 ranks x 2 x 2 = 8 samples
    # reach neither the target (32) nor the floor (16), so the policy told of k still
    # chooses BGN+WS over both ranks, without accumulation
    for r in records:
        if r["norm"] in accuracy.ACCUMULATING_NORMS:
            assert r["accumulation_steps"] == 2
        if r["norm"] == "policy_accum":
            assert r["policy_choice"] == "bgn g2 k1"
    # at 2 processes, 2 or 4 images each reach neither the 32-sample target nor the floor
    # of 16: the policy picks BGN+WS over both ranks, which is the forced BGN run itself
    for r in records:
        if r["norm"] == "policy":
            assert r["policy_choice"] == "bgn"
            twin = next(
                t
                for t in records
                if t["norm"] == "bgn" and t["per_worker_batch"] == r["per_worker_batch"]
            )
            assert r["accuracy"] == twin["accuracy"]
    # the regret table: the policy against the best fixed normalization, seed by seed
    regrets = payload["summary"]["regret"]
    assert [r["per_worker_batch"] for r in regrets] == [4, 2]
    for row in regrets:
        best = next(
            t["accuracy"]
            for t in records
            if (t["norm"], t["per_worker_batch"]) == (row["best"], row["per_worker_batch"])
        )
        assert row["regret"] == pytest.approx(row["policy_mean"] - best)
        assert row["regret"] <= 0 and row["best"] in accuracy.FIXED_NORMS
    # a second run finds every result in the cache and trains nothing
    monkeypatch.setattr(common, "spawn", lambda *a, **k: pytest.fail("trained again"))
    again = accuracy.main(["--tiny", "--out", str(tmp_path)])
    assert [r["accuracy"] for r in again["records"]] == [r["accuracy"] for r in records]


def test_benchmarks_page_holds_every_results_table():
    """docs/benchmarks.md holds every table of every benchmarks/results/*.md as it is now:
    each has its marker in the template, and the page was rebuilt since the results last
    changed (``python -m benchmarks.docs``)."""
    page = docs.build()
    for path in sorted(common.RESULTS_DIR.glob("*.md")):
        tables = re.findall(r"(?:^\|.*\n)+", path.read_text(), re.MULTILINE)
        assert tables, f"{path} holds no table"
        for table in tables:
            assert table in page, f"a table of {path.name} is not in the page"
    assert docs.PAGE.read_text() == page, "docs/benchmarks.md is stale: python -m benchmarks.docs"


def test_benchmarks_page_links_from_docs_and_refuses_a_results_file_without_marker(tmp_path):
    results, folder = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    folder.mkdir()
    (results / "a.md").write_text("### A\n\n| x |\n|:---|\n| 1 |\n\n![A](a.png)\n")
    template = folder / "template.md"
    template.write_text("# T\n\n<!-- results:a -->\n\n<!-- results:b -->\n")
    page = docs.build(template, results, folder / "page.md")
    assert "| x |\n|:---|\n| 1 |" in page and "![A](../results/a.png)" in page
    assert "Not measured yet" in page  # b has a marker but no results file yet
    (results / "c.md").write_text("### C\n")
    with pytest.raises(ValueError, match="c.md"):
        docs.build(template, results, folder / "page.md")


def test_markdown_table():
    table = common.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|:---|---:|", "| 1 | x |", "| 2 | y |"]


def test_cache_round_trip_and_fresh(tmp_path):
    cache = common.Cache(tmp_path, "demo")
    cache.put({"b": 2, "a": 1}, {"value": 3})
    assert {"a": 1, "b": 2} in common.Cache(tmp_path, "demo")
    assert common.Cache(tmp_path, "demo").get({"a": 1, "b": 2}) == {"value": 3}
    assert {"a": 1, "b": 2} not in common.Cache(tmp_path, "demo", fresh=True)


def floor_and_sync_bn_collectives(rank: int, world_size: int) -> dict[str, list[tuple]]:
    """Each rank's collectives in a steady-state training step (the second), for the
    scaling benchmark's collective floor and for distnorm's SyncBN on the same model."""
    calls = {}
    for norm in ("bn_collectives", "sync_bn"):
        torch.manual_seed(0)
        model = small_resnet(width=4)
        if norm == "bn_collectives":
            model = scaling.with_sync_bn_collectives(model)
        else:
            model = common.normalize(model, "sync_bn")
        images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        for _ in range(2):
            with recorded_collectives() as log:
                model(images).sum().backward()
        calls[norm] = [(call.name, call.numel) for call in log]
    return calls


def test_collective_floor_makes_exactly_sync_bns_collectives():
    """The floor is only a floor if it communicates what SyncBN communicates: the same
    collectives, in the same order, of the same sizes."""
    for calls in run_on_ranks(floor_and_sync_bn_collectives, 2):
        assert len(calls["sync_bn"]) == 12  # small_resnet's 6 BatchNorms, each way
        assert calls["bn_collectives"] == calls["sync_bn"]
