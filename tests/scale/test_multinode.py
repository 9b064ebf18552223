"""Multi-node runs: ``examples/distributed.py`` launched as two torchrun "nodes" on this machine (two separate
``torch.distributed.run`` agents, ``--nnodes=2 --nproc_per_node=1``, static rendezvous on a free local port, gloo)
writes the same report as the single-node run with two processes (``--nnodes=1 --nproc_per_node=2``).

On the two nodes every worker has LOCAL_RANK 0 while its global rank is 0 or 1, so a rank taken from the wrong one
(sharding, hook ownership, who writes the report) shows up as a different report or a missing file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tl_sparsity.report import SparsityReport

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed.py"
TIMEOUT_S = 240  # for all the agents of one launch together


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch: list[str], example_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(EXAMPLE), *example_args]


def _descendants(pid: int) -> list[int]:
    """The living descendants of process ``pid``, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a torchrun agent and its workers. The workers run in sessions of their own, so killing the agent's
    process group would leave them running: the agent is stopped (it starts no more), then each is killed by id."""
    os.killpg(proc.pid, signal.SIGSTOP)
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)  # anything else left in the agent's own group
    proc.wait()


def _run_agents(cmds: list[list[str]], logdir: Path, timeout: float = TIMEOUT_S) -> list[str]:
    """Start every command (each a torchrun agent, in its own process group), wait for all, return their logs
    (stdout and stderr together). On a timeout or a failed agent every agent still running is killed with its
    workers, and the test fails with the logs."""
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:  # files, not pipes: a full pipe would stall an agent
        logs = [files.enter_context(open(logdir / f"agent{i}.log", "w+")) for i in range(len(cmds))]
        try:
            for cmd, log in zip(cmds, logs):
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=logdir,
                                              start_new_session=True))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one agent failed: the others may wait for it forever
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill_tree(p)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
    if any(p.returncode != 0 for p in procs):
        detail = "\n".join(f"--- agent {i} (rc {p.returncode}): {' '.join(c)}\n{t[-3000:]}"
                           for i, (p, c, t) in enumerate(zip(procs, cmds, texts)))
        pytest.fail(f"a torchrun agent failed or timed out after {timeout} s:\n{detail}")
    return texts


def _single_node(args: list[str], out: Path, tmp: Path) -> list[str]:
    launch = ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    (tmp / "single").mkdir()
    return _run_agents([_torchrun(launch, [*args, "--out", str(out)])], tmp / "single")


def _two_nodes(args: list[str], out: Path, tmp: Path, rdzv: str = "static") -> list[str]:
    """Two agents of one process each. ``static``: node ranks 0 and 1 given, agent 0 hosts the store; ``c10d``: the
    c10d rendezvous (either agent may host it and become node 0)."""
    port = _free_port()
    if rdzv == "static":
        launches = [["--nnodes=2", f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}"]
                    for r in (0, 1)]
    else:
        launches = [["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                     f"--rdzv-id=multinode-{port}"]] * 2
    (tmp / "nodes").mkdir()
    return _run_agents([_torchrun([*launch, "--nproc_per_node=1"], [*args, "--out", str(out)])
                        for launch in launches], tmp / "nodes")


def _check_same_report(mode: str, one: Path, two: Path) -> None:
    ref, got = SparsityReport.load(one), SparsityReport.load(two)
    hooks = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post",
             "blocks.1.mlp.hook_post"]
    assert sorted(r["hook"] for r in ref.rows) == hooks  # (their order depends on the TransformerLens version)
    assert ref.meta[f"{'hook' if mode == 'hooks' else 'data'}_parallel"]["world_size"] == 2
    assert ref.meta["neurons"]["n_tokens_seen"] == {h: 1008 for h in hooks[1::2]}  # both ranks' tokens, once
    for hook in hooks:  # 2 x 8 x 63 = 992 rows (BOS skipped): one learner batch of 512 (rank 0's 504, rank 1's 8)
        assert ref[hook]["n_tokens"] + ref[hook]["n_heldout"] == 512
        assert ref[hook]["normalized_loss"] > 0 and ref[hook]["status"].startswith(("ok", "not converged"))
    for col in ("n_tokens", "n_heldout", "lam", "normalized_loss", "normalized_loss_se", "nnz", "fvu"):
        assert [got[h][col] for h in hooks] == [ref[h][col] for h in hooks], col  # bit for bit: the same ranks
    assert got == ref  # every row, table and the metadata


ARGS = ["--tokens", "1008"]  # 2 batches of 8 x 64 tokens: one per rank


def _header(mode: str) -> str:
    layout = "hooks owned per rank: [2, 2]" if mode == "hooks" else "every hook's learner shared by all ranks"
    return f"# 2 ranks, {mode}-parallel, {layout}"


@pytest.mark.parametrize("mode", [pytest.param("hooks", marks=pytest.mark.slow), "data"])  # ~20 s each on 2 cores
def test_two_nodes_of_one_process_report_the_same_numbers_as_one_node_of_two(mode, tmp_path):
    one, two = tmp_path / "one_node.json", tmp_path / "two_nodes.json"
    (single_log,) = _single_node([*ARGS, "--mode", mode], one, tmp_path)
    node0_log, node1_log = _two_nodes([*ARGS, "--mode", mode], two, tmp_path)
    assert _header(mode) in single_log and _header(mode) in node0_log  # global rank 0 is on node 0: it reports
    assert "| blocks." not in node1_log  # node 1's worker is global rank 1 (its LOCAL_RANK is 0): it prints nothing
    _check_same_report(mode, one, two)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "data"])
def test_two_nodes_joined_by_the_c10d_rendezvous_report_the_same_numbers_as_one_node_of_two(mode, tmp_path):
    one, two = tmp_path / "one_node.json", tmp_path / "two_nodes.json"
    _single_node([*ARGS, "--mode", mode], one, tmp_path)
    logs = _two_nodes([*ARGS, "--mode", mode], two, tmp_path, rdzv="c10d")
    assert sum(_header(mode) in log for log in logs) == 1  # exactly one agent's worker is global rank 0
    _check_same_report(mode, one, two)
