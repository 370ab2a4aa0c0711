"""compute_eva_state across 2 gloo processes: equals one process on the union; crashes end cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import token_batches
from eva_lora import EvaConfig, EvaState, compute_eva_state
from eva_lora.capture import collect_statistics
from eva_lora.pca import captured_variance

WORKER = Path(__file__).parent / "dist_worker.py"


def launch(tmp_path: Path, scenario: str, world: int = 2, timeout: float = 120) -> tuple[list[dict], float]:
    init_file = tmp_path / "pg_init"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(init_file), str(tmp_path),
                               scenario], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    start = time.perf_counter()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"distributed scenario {scenario} hung for {timeout} s")
    seconds = time.perf_counter() - start
    reports = []
    for r, proc in enumerate(procs):
        report = tmp_path / f"rank{r}.json"
        assert report.is_file(), proc.stdout.read().decode()[-3000:]
        reports.append(json.loads(report.read_text()))
    return reports, seconds


def single_process(batches, check_every: int = 1) -> EvaState:
    cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=100, progress=False, stats_dtype="float64",
                    check_every=check_every)
    from dist_worker import tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_eva_state(tiny_llama(), iter(batches), cfg)


def test_sharded_ranks_equal_one_process_fed_the_union(tmp_path):
    reports, _ = launch(tmp_path, "sharded")
    assert all(r["ok"] for r in reports), reports
    batches = token_batches(101, 8, batch=4, seq=16)
    ref = single_process(batches, check_every=2)  # 2 ranks check after every 2 global batches
    states = [EvaState.load(tmp_path / f"rank{r}") for r in range(2)]
    for state in states:
        assert state.n_batches == ref.n_batches == 8 and state.group_tokens == ref.group_tokens
        assert state.ranks == ref.ranks
        for got, want in zip(state.group_eigenvalues, ref.group_eigenvalues):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)  # Ritz values at residual 1e-3
    torch.testing.assert_close(states[0].group_components[3], states[1].group_components[3], rtol=0, atol=0)
    from dist_worker import tiny_llama

    cfg64 = EvaConfig(rank=4, rho=2.0, stats_dtype="float64", progress=False)
    exact = {g.names[0]: g.stats.covariance() for g in collect_statistics(tiny_llama(), batches, cfg64)}
    for names, comps in zip(states[0].groups, states[0].group_components):
        assert captured_variance(exact[names[0]], comps) >= 0.999
    # statistics, not activations, travelled: two all-reduces of d^2 + d + 1 numbers per group and check
    assert reports[0]["history"]["bytes_communicated"] > 0


def test_replicated_inputs_are_not_counted_twice(tmp_path):
    reports, _ = launch(tmp_path, "replicated")
    assert all(r["ok"] for r in reports), reports
    ref = single_process(token_batches(101, 8, batch=4, seq=16))
    state = EvaState.load(tmp_path / "rank1")
    assert state.group_tokens == ref.group_tokens and state.n_batches == 8
    for got, want in zip(state.group_components, ref.group_components):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_crash_on_one_rank_ends_the_other_with_a_clear_error(tmp_path):
    reports, seconds = launch(tmp_path, "crash", timeout=90)
    assert reports[1]["ok"] is False and "simulated failure on rank 1" in reports[1]["error"]
    assert reports[0]["ok"] is False and reports[0]["type"] == "CollectiveError"
    assert "another rank probably crashed" in reports[0]["error"]
    assert seconds < 60


@pytest.mark.slow
def test_torchrun_train_computes_eva_once_collectively(tmp_path, tiny_llama_dir):
    """`torchrun --nproc_per_node 2 eva train`: EVA from both ranks' batches, DDP, one writer."""
    data = Path(__file__).parent / "assets/data"
    common = ["--model", str(tiny_llama_dir), "--task", "commonsense", "--data-dir", str(data), "train_limit=16",
              "max_length=96", "batch_size=2", "svd_batch_size=4", "rank=4", "eva.tau=0.999999",
              "eva.progress=false", "logging_steps=1"]
    out = tmp_path / "ddp"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29617", "-m", "eva_lora.cli", "train", *common, "--init", "eva", "--output-dir", str(out),
                           "--no-eval", "max_steps=2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert (out / "adapter/adapter_config.json").is_file()
    from eva_lora.cli import main

    # one process with the same checks: after every 2 global batches
    assert main(["init", *common, "eva.check_every=2", "--output", str(tmp_path / "single")]) == 0
    single, ddp = EvaState.load(tmp_path / "single"), EvaState.load(out / "eva_state")
    assert ddp.n_batches == single.n_batches == 4 and ddp.group_tokens == single.group_tokens
    assert ddp.ranks == single.ranks
    for got, want in zip(ddp.group_eigenvalues, single.group_eigenvalues):  # float32 statistics here
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want[0]))
