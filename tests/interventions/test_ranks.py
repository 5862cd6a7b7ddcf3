"""Sweeps across ranks: two gloo ranks under torchrun return the single-process result, bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxlens.interventions import ranks as R
from tests.interventions.ranks_worker import CASES, metric, setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("n", "world"), [(0, 2), (1, 2), (7, 2), (7, 3), (10, 4), (3, 5)])
def test_owners_partition_the_chunks(n, world):
    costs = [float(1 + (j * 7) % 5) for j in range(n)]
    owner = R.owners(costs, world)
    assert len(owner) == n and all(0 <= r < world for r in owner)  # each chunk has exactly one rank
    share = R.Share(None, n, [[j] for j in range(n)], costs, [])
    assert share.mine() == [[j] for j in range(n)]  # a single process computes every chunk
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(world)]
    if n >= world:
        assert min(load) > 0 and max(load) - min(load) <= max(costs)  # unequal division, balanced within a chunk
    assert owner == R.owners(costs, world)  # deterministic
    with pytest.raises(ValueError):
        R.owners(costs, 0)


def test_overlapping_chunks_are_refused():
    with pytest.raises(ValueError, match="disjoint"):
        R.Share(None, 4, [[0, 1], [1, 2]], [1.0, 1.0], [])
    with pytest.raises(ValueError, match="disjoint"):
        R.Share(None, 2, [[0, 2]], [1.0], [])


def test_ranks_argument_is_checked(monkeypatch):
    cpu = torch.device("cpu")
    assert R.resolve(None, cpu) is None
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert R.resolve("auto", cpu) is None  # no group, no torchrun: a single-process sweep
    with pytest.raises(ValueError, match="ranks must be"):
        R.resolve("all", cpu)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        R.resolve("auto", cpu)


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path_factory.mktemp("ranks")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.interventions.ranks_worker",
                          str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(ranks_run, name):
    sweep, kw = CASES[name]
    m, corrupted, cache = setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels (the result must be bit-identical)
    try:
        alone = sweep(m, corrupted, cache, metric, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)
    for seen in ranks_run:
        assert torch.equal(seen[name], alone), name  # every rank returns the full single-process result
        assert torch.equal(seen[name + "/alone"], alone)
    counts = [re.findall(r"rank (\d) of 2 computes (\d+) of (\d+) chunks", " ".join(s[name + "/log"]))
              for s in ranks_run]
    (r0, k0, n0), (r1, k1, n1) = counts[0][0], counts[1][0]
    assert (r0, r1) == ("0", "1") and n0 == n1 and int(k0) + int(k1) == int(n0) and int(k0) > 0 and int(k1) > 0


def test_the_group_is_initialised_from_torchrun_and_failures_reach_every_rank(ranks_run):
    r0, r1 = ranks_run
    assert r0["initialised_before"] is False and (r0["backend"], r0["world"], r1["rank"]) == ("gloo", 2, 1)
    assert any("initialised a gloo process group" in line for line in r0[next(iter(CASES)) + "/log"])
    assert r0["metric_fails"].startswith("RuntimeError: patch_sweep: rank(s) [1] failed")
    assert r1["metric_fails"] == "ValueError: rank 1's metric fails"
    assert r0["inputs_differ"] == r1["inputs_differ"] and "disagree" in r0["inputs_differ"]


def test_the_hooked_cases_run_the_hook():
    m, corrupted, cache = setup()
    for name in ("resid_post_hooked", "attn_out_hooked_batched"):
        sweep, kw = CASES[name]
        plain = sweep.__wrapped__ if hasattr(sweep, "__wrapped__") else None
        assert plain is not None
        assert not torch.equal(sweep(m, corrupted, cache, metric, progress=False, **kw),
                               plain(m, corrupted, cache, metric, progress=False, **kw))
