"""launch/train.py on two nodes, for real: two ``torchrun`` agents on this machine
(``--nnodes 2 --nproc-per-node 2``, c10d rendezvous on localhost) make one world of 4
ranks, as two machines of a cluster would (launch/slurm.sbatch starts one agent per node).

A per-worker batch of 16 under the default policy (target 32 samples per statistic) asks
for sync groups of 2 ranks: the plan must see the node layout (LOCAL_WORLD_SIZE=2 under
torchrun) and keep each group inside a node, {0, 1} on the first agent and {2, 3} on the
second. Each rank writes a JSON summary (``--summary-dir``) with its node, the plan, each
layer's group members and a digest of its running statistics, which must be identical
within a node's group and, since the two groups see different data, differ across them.

The agents run twice: as started by hand, and with the variables ``srun`` gives each
agent under launch/slurm.sbatch (one task per node), where SLURM_NTASKS_PER_NODE=1 counts
agents, not ranks: the plan must still take its node size from torchrun's
LOCAL_WORLD_SIZE.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
NODES, PER_NODE = 2, 2
BATCH = 16  # 2 ranks x 16 = 32 samples: the target, reached inside one node
STEPS = 2  # the fewest that still include DDP's buffer broadcast between steps
TIMEOUT_S = 240  # ~20 s on 2 cores; a rendezvous that never completes fails here instead
# What srun exports to agent (node) i of launch/slurm.sbatch's job: 2 tasks, 1 per node.
SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": str(NODES),
    "SLURM_NTASKS": str(NODES),
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_LOCALID": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_command(port: int, run_id: str, out: Path) -> list[str]:
    """One node's torchrun agent; c10d rendezvous assigns the node ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    nodes = ["--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE)]
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", run_id]
    train = ["launch/train.py", "--epochs", "1", "--steps-per-epoch", str(STEPS)]
    paths = ["--out", str(out), "--summary-dir", str(out / "summary")]
    return [*torchrun, *nodes, *rdzv, *train, "--per-worker-batch", str(BATCH), *paths]


def stop(agent: subprocess.Popen) -> None:
    """End an agent that is still running, and its workers (its own process group)."""
    if agent.poll() is None:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()


@pytest.fixture(scope="module", params=["by hand", "under srun"])
def two_nodes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("multinode")
    port, run_id = free_port(), f"distnorm-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU and gloo, also on a GPU machine
        "PYTHONUNBUFFERED": "1",
    }
    for variable in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(variable, None)  # the agents must provide them
    logs = [out / f"agent{i}.log" for i in range(NODES)]
    agents: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
        for node, log in enumerate(logs):
            srun = {**SRUN, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node)}
            with log.open("w") as sink:
                agents.append(
                    subprocess.Popen(
                        agent_command(port, run_id, out),
                        cwd=REPO,
                        env={**env, **srun} if request.param == "under srun" else env,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # stop() ends the agent's workers with it
                    )
                )
        for agent in agents:
            agent.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            stop(agent)
    seconds = time.monotonic() - start
    log = "\n".join(f"--- agent {i}\n{path.read_text()}" for i, path in enumerate(logs))
    codes = [agent.returncode for agent in agents]
    assert seconds < TIMEOUT_S, f"the two agents ran past {TIMEOUT_S} s:\n{log[-8000:]}"
    assert codes == [0] * NODES, f"agents exited with {codes}:\n{log[-8000:]}"
    files = sorted((out / "summary").glob("rank*.json"))
    summaries = sorted((json.loads(f.read_text()) for f in files), key=lambda s: s["rank"])
    print(f"\ntwo torchrun agents ({request.param}), 2 x 2 ranks: {seconds:.0f} s")
    return {"summaries": summaries, "log": log}


def test_two_agents_make_one_world_of_two_nodes_of_two(two_nodes: dict[str, Any]) -> None:
    summaries, log = two_nodes["summaries"], two_nodes["log"]
    assert [s["rank"] for s in summaries] == [0, 1, 2, 3], log[-8000:]
    for s in summaries:
        assert (s["world_size"], s["engine_world_size"], s["backend"]) == (4, 4, "gloo"), s
        assert s["launcher"] == "torchrun-style environment"
        # Consecutive ranks on one agent: the rendezvous numbers the nodes, torchrun the
        # ranks within them.
        assert (s["node_rank"], s["local_rank"]) == (str(s["rank"] // 2), s["rank"] % 2), s
        assert (s["plan"]["world_size"], s["plan"]["ranks_per_node"]) == (4, 2), s["plan"]
    # Rank 0 prints the plan, whose header says what layout it planned for.
    assert f"per-worker batch {BATCH}, world 4 ranks, 2 per node" in log, log[-8000:]


def test_sync_groups_stay_inside_a_node(two_nodes: dict[str, Any]) -> None:
    for s in two_nodes["summaries"]:
        for layer in s["plan"]["layers"]:
            assert (layer["norm"], layer["sync_group_size"]) == ("sync_bn", 2), layer
            assert layer["reason"].endswith(", 1 node"), layer
        node = [2 * int(s["node_rank"]), 2 * int(s["node_rank"]) + 1]
        layers = s["norm_layers"]
        assert len(layers) == 6, layers
        for name, layer in layers.items():
            assert layer["now"].startswith("SyncBatchNorm"), (name, layer)  # or ...2d
            assert layer["group"] == "2 of 4 ranks", (name, layer)
            assert layer["group_ranks"] == node, f"rank {s['rank']} {name}: {layer}"


def test_statistics_identical_within_a_node_and_different_across(
    two_nodes: dict[str, Any],
) -> None:
    digests = [
        {name: layer["running_stats_sha256"] for name, layer in s["norm_layers"].items()}
        for s in two_nodes["summaries"]
    ]
    assert digests[0] == digests[1], "ranks 0 and 1 (node 0) differ"
    assert digests[2] == digests[3], "ranks 2 and 3 (node 1) differ"
    # Each node's group averaged its own shards: a group spanning the world (or DDP's
    # buffer broadcast alone) would make all four equal.
    same = [name for name in digests[0] if digests[0][name] == digests[2][name]]
    assert not same, f"layers with the same statistics on both nodes: {same}"
