"""Data-parallel AD-TUNING (adtuning.distributed) on CPU with gloo.

Two processes with batch B each must train exactly like one process with batch 2B on the same
data: the same child networks (bitwise), the same final delta and dev metric (within float
rounding: only the summation order differs), Fisher scores within tolerance; a run interrupted
under two processes resumes to the uninterrupted result; each optimizer step all-reduces one
buffer of 4 * (k + head + 1) bytes. Library pieces run in two processes started with
torch.multiprocessing (a file store); the CLI runs under torchrun, as users start it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from adtuning import ChildNetwork, train
from adtuning.distributed import DataParallel, launched_world_size, resolve_device
from adtuning.fisher import estimate_fisher
from adtuning.optim import SparseAdamW
from adtuning.search import AdaptiveSearch, SearchConfig
from adtuning.speech.data import limit_items, make_loader, shard_batches
from adtuning.speech.metrics import DiarizationCounts
from tests.helpers import TinyMLP, mlp_loss

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


# ---------------------------------------------------------------------------------------------
# A tiny Speech Commands corpus (17 training clips: the last global batch of 8 has one clip, so
# one rank gets an empty part), written with the fixture helpers of tests/speech.

def write_ks_corpus(base: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "speech"))
    from speech_fixtures import SR, tone, write

    root = base / "speech_commands_v0.01"
    val = []
    for w, (word, freq) in enumerate({"yes": 300.0, "no": 600.0, "bed": 900.0}.items()):
        for s in range(7):
            name = f"{w:02d}{s:02d}abcd_nohash_0.wav"
            write(root / word / name, tone(freq + 15 * s, 1.0, seed=100 * w + s))
            if s >= 5:
                val.append(f"{word}/{name}")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n")
    rng = np.random.default_rng(7)
    for k in range(2):
        write(root / "_background_noise_" / f"noise_{k}.wav", (0.05 * rng.standard_normal(2 * SR)).astype(np.float32))
    test_root = base / "speech_commands_test_set_v0.01"
    for cls, freq in (("yes", 310.0), ("no", 610.0), ("_unknown_", 910.0)):
        for s in range(2):
            write(test_root / cls / f"t{s}_nohash_0.wav", tone(freq, 1.0, seed=900 + s))
    write(test_root / "_silence_" / "silence_0.wav", (0.01 * rng.standard_normal(SR)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def ks_corpus(tmp_path_factory):
    return write_ks_corpus(tmp_path_factory.mktemp("ks"))


# ---------------------------------------------------------------------------------------------
# Sharding of batches

@pytest.mark.parametrize("sizes", [[8, 8, 1], [5], [1], [7, 0], [2, 3, 97]])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_of_each_global_batch_concatenate_to_it(sizes, world):
    batches, start = [], 0
    for n in sizes:
        batches.append(list(range(start, start + n)))
        start += n
    parts = [shard_batches(batches, r, world) for r in range(world)]
    for i, batch in enumerate(batches):
        pieces = [parts[r][i] for r in range(world)]
        assert sum(pieces, []) == batch
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    with pytest.raises(ValueError, match="rank 2 of 2"):
        shard_batches(batches, 2, 2)


def test_limit_items_cuts_the_plan_in_batch_order():
    assert limit_items([[3, 1], [0, 4], [2]], 3) == [[3, 1], [0]]
    assert limit_items([[3, 1]], 9) == [[3, 1]]
    with pytest.raises(ValueError, match="max_items"):
        limit_items([[1]], 0)


def test_sharded_loader_yields_each_ranks_part_of_the_single_process_batches(ks_corpus):
    from adtuning.speech import build_dataset

    train_set = build_dataset("ks", ks_corpus, "train")
    for kwargs in (dict(shuffle=True, seed=3, epoch=1), dict(shuffle=False), dict(shuffle=True, seed=1, max_items=11)):
        single = [b["ids"] for b in make_loader(train_set, 8, **kwargs)]
        parts = [list(make_loader(train_set, 8, shard=(r, WORLD), **kwargs)) for r in range(WORLD)]
        assert all(len(p) == len(single) for p in parts)
        for i, ids in enumerate(single):
            got = []
            for p in parts:
                if p[i] is not None:
                    assert p[i]["global_batch_size"] == len(ids)
                    got += p[i]["ids"]
            assert got == ids
    # 17 clips in batches of 8: one global batch has one clip, and rank 0's part of it is empty.
    parts = [list(make_loader(train_set, 8, shuffle=False, shard=(r, WORLD))) for r in range(WORLD)]
    assert parts[0][-1] is None and len(parts[1][-1]["ids"]) == 1 and parts[1][-1]["global_batch_size"] == 1
    resumed = make_loader(train_set, 8, shuffle=False, skip_batches=2, shard=(1, WORLD))
    assert [b["ids"] for b in resumed] == [parts[1][-1]["ids"]] and resumed.position == 3


# ---------------------------------------------------------------------------------------------
# The optimizer's compact gradients in caller-owned storage

@pytest.mark.parametrize("weight_grad", ["dense", "sparse"])
def test_bound_compact_grad_storage_changes_nothing_but_where_gradients_live(weight_grad):
    from adtuning.sparse_grad import install_sparse_weight_grad

    def run(bind):
        torch.manual_seed(0)
        model = TinyMLP(d_in=7, d_hidden=13, classes=5)
        upstream = {n: p for n, p in model.named_parameters() if n.startswith(("fc1", "norm"))}
        head = [model.fc2.weight, model.fc2.bias]
        scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) for n, p in upstream.items()}
        child = ChildNetwork.from_scores(scores, 0.3)
        opt = SparseAdamW([{"named_params": upstream, "child": child}, {"params": head}], lr=1e-2)
        handle = install_sparse_weight_grad(model, opt, weight_grad)
        storage = torch.full((opt.grad_store.numel(),), float("nan")) if bind else None
        if bind:
            opt.grad_store.bind(storage)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for _ in range(2):  # accumulation into the bound views
                x, y = torch.randn(6, 7, generator=gen), torch.randint(0, 5, (6,), generator=gen)
                mlp_loss(model, (x, y)).mean().backward()
            if bind:
                grads = [opt.grad_store.grad(p) for p in opt.sparse_parameters()]
                assert all(g.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr() for g in grads)
            opt.clip_grad_norm_(0.1)
            opt.step()
            opt.zero_grad(set_to_none=step % 2 == 0)
        if bind:
            opt.grad_store.release()
            assert all(opt.grad_store.grad(p) is None or opt.grad_store.grad(p).untyped_storage().data_ptr()
                       != storage.untyped_storage().data_ptr() for p in opt.sparse_parameters())
        handle.remove()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, bound = run(False), run(True)
    for name, value in plain.items():
        assert torch.equal(value, bound[name]), name


def test_bind_compact_grad_storage_checks_the_buffer():
    model = TinyMLP()
    child = ChildNetwork.from_scores({n: torch.rand(p.shape) for n, p in model.named_parameters()}, 0.2)
    opt = SparseAdamW([{"named_params": model.named_parameters(), "child": child}])
    with pytest.raises(ValueError, match=f"{child.k} entries"):
        opt.grad_store.bind(torch.zeros(child.k + 1))
    with pytest.raises(ValueError, match="float32"):
        opt.grad_store.bind(torch.zeros(child.k, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# The launcher's environment: WORLD_SIZE is parsed in one place

@pytest.mark.parametrize("value, expected", [(None, 1), ("1", 1), ("4", 4), (" 3 ", 3)])
def test_launched_world_size_reads_world_size(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    assert launched_world_size() == expected


@pytest.mark.parametrize("value", ["two", "", "1.5", "0", "-2"])
def test_a_bad_world_size_is_one_error_naming_the_variable_and_value(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match=f"WORLD_SIZE={value!r}"):
        launched_world_size()
    with pytest.raises(ValueError, match=f"WORLD_SIZE={value!r}"):
        DataParallel.from_env()


def test_from_env_without_a_launcher_is_single_process_and_names_missing_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert DataParallel.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DataParallel.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        DataParallel.from_env()
    for name, value in (("RANK", "first"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="RANK='first' is not an integer"):
        DataParallel.from_env()


# ---------------------------------------------------------------------------------------------
# Library pieces in two processes (torch.multiprocessing, file store)

class ToyProblem:
    """A dropout-free classification toy (so one and two processes draw no random numbers),
    served in global batches of ``batch_size``; with ``shard=(rank, world)`` each rank gets its
    contiguous part (``None`` when empty) and its share of the global batch's mean loss."""

    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, batch_size, shard=None, n_train=41):
        torch.manual_seed(0)
        self.upstream = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh())
        self.head = nn.Linear(17, 3)
        self.model = nn.Sequential(self.upstream, self.head)
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n_train, 6, generator=gen)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
        self.dev_x = torch.randn(32, 6, generator=gen)
        self.dev_y = (self.dev_x[:, 0] > 0).long() + (self.dev_x[:, 1] > 0.5).long()
        self.batch_size, self.shard = batch_size, shard
        self.upstream_params = dict(self.upstream.named_parameters())
        self.head_params = dict(self.head.named_parameters())

    def train_batches(self, epoch, skip):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1000 + epoch))
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            n = len(idx)
            if self.shard is not None:
                rank, world = self.shard
                idx = idx[(rank * n) // world:((rank + 1) * n) // world]
                if len(idx) == 0:
                    yield None
                    continue
            yield self.x[idx], self.y[idx], n

    def loss(self, batch):
        if batch is None:
            return None
        x, y, n = batch
        return F.cross_entropy(self.model(x), y) * (len(y) / n)

    def evaluate(self, split):
        with torch.no_grad():
            logits = self.model(self.dev_x)
        return {"accuracy": float((logits.argmax(-1) == self.dev_y).float().mean()), "nll": float(F.cross_entropy(logits, self.dev_y))}

    def has_split(self, split):
        return split == "dev"


def toy_children(problem):
    gen = torch.Generator().manual_seed(9)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in problem.upstream_params.items()}
    return ChildNetwork.nested(scores, (0.05, 0.3, 1.0))


def toy_config(weight_grad):
    return SearchConfig(total_steps=12, rungs=(0.5,), keep=(1,), lr=5e-3, head_lr=1e-2, warmup_steps=2, grad_accum=2,
                        max_grad_norm=0.05, weight_grad=weight_grad)


def run_toy_search(global_batch_size, weight_grad, dp=None):
    problem = ToyProblem(global_batch_size, shard=None if dp is None else (dp.rank, dp.world_size))
    search = AdaptiveSearch(problem, toy_children(problem), toy_config(weight_grad), progress=False, data_parallel=dp)
    best = search.run()
    return {
        "params": {n: p.detach().clone() for n, p in problem.model.named_parameters()},
        "losses": [c.train_losses for c in search.candidates], "best": best.index,
        "steps": [c.step for c in search.candidates], "k": [c.child.k for c in search.candidates],
        "head": sum(p.numel() for p in problem.head_params.values()),
    }


def fisher_batches(shard=None):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(13, 7, generator=gen), torch.randint(0, 5, (13,), generator=gen)
    batches = []
    for start in range(0, 13, 4):  # global batches of 4, the last with one sample
        idx = torch.arange(start, min(13, start + 4))
        if shard is not None:
            n = len(idx)
            idx = idx[(shard[0] * n) // shard[1]:((shard[0] + 1) * n) // shard[1]]
        batches.append((x[idx], y[idx]) if len(idx) else None)
    return batches


def fisher_runs(dp=None):
    torch.manual_seed(3)
    model = TinyMLP()
    shard = None if dp is None else (dp.rank, dp.world_size)
    runs = {}
    for label, kwargs in {"loop": dict(backend="reference"),
                          "in-backward": dict(backend="reference", algorithm="in-backward"),
                          "batch": dict(mode="batch", clip_norm=0.5)}.items():
        runs[label] = estimate_fisher(model, fisher_batches(shard), mlp_loss, params=["fc1.weight", "fc1.bias", "norm.weight"],
                                      progress=False, data_parallel=dp, **kwargs)
    return runs


def _worker(rank, store_path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dp = DataParallel.initialize(rank=rank, world_size=WORLD, local_rank=rank, device="cpu", timeout_s=120,
                                 init_method=f"file://{store_path}")
    results = {}
    original = dist.all_reduce
    sizes = []

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        for weight_grad in ("dense", "sparse"):
            sizes.clear()
            results[weight_grad] = run_toy_search(8, weight_grad, dp)  # each rank: 4 of every 8
            results[weight_grad]["allreduce_sizes"] = list(sizes)
    finally:
        dist.all_reduce = original
    results["fisher"] = fisher_runs(dp)

    # Rank 1 passes other children: both ranks end with rank 0's.
    scores = {"w": torch.rand(40, generator=torch.Generator().manual_seed(rank))}
    results["children"] = [c.indices["w"] for c in dp.broadcast_children(ChildNetwork.nested(scores, (0.1, 0.5)))]
    counts = DiarizationCounts(speaker_scored=2.0 + rank, correct=1.0)
    state = {"nll_sum": 0.5 * (rank + 1), "count": 3 + rank, "hyp": [f"h{rank}"], "counts": counts}
    results["merged"] = dp.merge_eval_states(state)
    try:
        dp.check_replicas({"w": torch.full((3,), float(rank))}, "the test tensors")
    except RuntimeError as err:
        results["drift"] = str(err)
    results["same"] = dp.check_replicas({"w": torch.ones(3)}, "the test tensors")
    # staged: rank 0 first (it fills a cache), then the others; one rank's error reaches all.
    log = Path(out_dir) / "staged.log"
    results["staged"] = dp.staged(lambda: log.open("a").write(f"{rank}\n"))
    for name, fn in (("staged_error", lambda: dp.staged(lambda: 1 / rank)),
                     ("main_error", lambda: dp.run_on_main(lambda: int("not a number")))):
        try:
            fn()
        except (ZeroDivisionError, ValueError) as err:
            results[name] = type(err).__name__
    results["out_dir"] = out_dir
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dp.barrier()
    dp.close()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("spawned")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("weight_grad", ["dense", "sparse"])
def test_two_processes_train_like_one_with_the_doubled_batch(spawned, weight_grad):
    torch.set_num_threads(1)
    single = run_toy_search(8, weight_grad)
    ranks = [r[weight_grad] for r in spawned]
    for name, value in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name  # replicas stay identical
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["best"] == ranks[1]["best"] == single["best"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for got, expected in zip(ranks[0]["losses"], single["losses"]):
        assert [s for s, _ in got] == [s for s, _ in expected]
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_grad", ["dense", "sparse"])
def test_one_allreduce_of_compact_gradients_per_optimizer_step(spawned, weight_grad):
    run = spawned[0][weight_grad]
    # grad_accum=2: one call per optimizer step, not per micro-batch, of 4 * (k + head + 1) bytes.
    expected = []
    order = [0, 1, 2] + [run["best"]]  # rung 0 trains every candidate, then the survivor continues
    for i, cand in enumerate(order):
        steps = 6 if i < 3 else run["steps"][cand] - 6
        expected += [4 * (run["k"][cand] + run["head"] + 1)] * steps
    assert run["allreduce_sizes"] == expected
    dense_ddp = 4 * (run["k"][2] + run["head"])  # candidate P=1: every scored entry, what DDP sends
    assert 4 * (run["k"][0] + run["head"] + 1) < 0.2 * dense_ddp


def test_distributed_fisher_scores_equal_the_single_process_scores(spawned):
    single = fisher_runs()
    for label, scores in single.items():
        for name, value in scores.items():
            assert torch.equal(spawned[0]["fisher"][label][name], spawned[1]["fisher"][label][name]), (label, name)
            torch.testing.assert_close(spawned[0]["fisher"][label][name], value, rtol=1e-5, atol=1e-9)


def test_children_are_broadcast_and_eval_states_reduced_as_counts(spawned):
    expected = ChildNetwork.nested({"w": torch.rand(40, generator=torch.Generator().manual_seed(0))}, (0.1, 0.5))
    for r in spawned:
        assert all(torch.equal(got, c.indices["w"]) for got, c in zip(r["children"], expected))
        merged = r["merged"]
        assert merged["count"] == 7 and merged["nll_sum"] == 1.5 and merged["hyp"] == ["h0", "h1"]
        assert merged["counts"].speaker_scored == 5.0 and merged["counts"].correct == 2.0
        assert "rank 1 differ from rank 0" in r["drift"] and r["same"] is None
        assert r["staged_error"] == "ZeroDivisionError" and r["main_error"] == "ValueError"


def test_staged_runs_rank_0_first(spawned):
    log = Path(spawned[0]["out_dir"]) / "staged.log"
    assert log.read_text() == "0\n1\n"


# ---------------------------------------------------------------------------------------------
# The CLI under torchrun

SMALL = ["--upstream", "tiny-hubert", "--steps", "6", "--candidates", "0.01,0.1", "--early-ratio", "0.5", "--fisher-samples", "12",
         "--eval-interval", "3", "--checkpoint-interval", "2", "--lr", "5e-3", "--threads", "1", "--no-progress", "--no-plots",
         "--log-level", "WARNING", "--dist-timeout", "120"]

RUNNER = textwrap.dedent('''
    """torchrun worker for tests/test_distributed.py: adtuning.train.main with a test's fault injected."""
    import os
    import sys

    from adtuning import train
    from adtuning.search import AdaptiveSearch

    mode = os.environ.get("ADTUNING_TEST_FAULT", "")
    if mode == "interrupt":  # every rank stops in the middle of the second segment of the plan
        original, calls = AdaptiveSearch._train, {"n": 0}

        def interrupted(self, cand, until):
            calls["n"] += 1
            if calls["n"] == 3:
                original(self, cand, until - 1)
                raise KeyboardInterrupt
            return original(self, cand, until)

        AdaptiveSearch._train = interrupted
    elif mode == "fail-rank-1" and os.environ["RANK"] == "1":
        original_loss, seen = train.SpeechProblem.loss, {"n": 0}

        def failing(self, batch):
            seen["n"] += 1
            if seen["n"] == 2:
                raise RuntimeError("injected failure on rank 1")
            return original_loss(self, batch)

        train.SpeechProblem.loss = failing
    sys.exit(train.main(sys.argv[1:]))
''')


def torchrun(args, tmp_path, fault=""):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADTUNING_TEST_FAULT": fault,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(runner), *args]
    # The timeout only guards the suite against a hang; it is far above a run's duration.
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ks_corpus):
    base = tmp_path_factory.mktemp("runs")
    data = ["--data-dir", str(ks_corpus)]
    single = base / "single"
    threads = torch.get_num_threads()
    try:
        assert train.main([*SMALL, *data, "--batch-size", "8", "--output-dir", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not slow the rest of the session
    dp = base / "dp"
    done = torchrun([*SMALL, *data, "--batch-size", "4", "--output-dir", str(dp)], base)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"single": single, "dp": dp, "data": data, "stdout": done.stdout}


def test_cli_two_processes_equal_one_process_with_the_doubled_batch(runs):
    single, dp = runs["single"], runs["dp"]
    for p in ("0_01", "0_1"):
        a, b = load_file(str(single / "children" / f"p{p}.safetensors")), load_file(str(dp / "children" / f"p{p}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p
    fa = json.loads((single / "children" / "fisher.json").read_text())["summary"]
    fb = json.loads((dp / "children" / "fisher.json").read_text())["summary"]
    assert fa["entries"] == fb["entries"]
    for key in ("max", "mean"):
        assert fb[key] == pytest.approx(fa[key], rel=1e-5)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, dp))
    assert sb["chosen_p"] == sa["chosen_p"] and sb["steps_spent"] == sa["steps_spent"]
    for split in ("dev", "test"):
        assert sb["final"][split]["accuracy"] == sa["final"][split]["accuracy"]
        assert sb["final"][split]["nll"] == pytest.approx(sa["final"][split]["nll"], rel=1e-5)
    for ca, cb in zip(sa["candidates"], sb["candidates"]):
        assert [s for s, _ in ca["train_loss"]] == [s for s, _ in cb["train_loss"]]
        assert [v for _, v in cb["train_loss"]] == pytest.approx([v for _, v in ca["train_loss"]], rel=1e-5)
    da, db = load_file(str(single / "delta" / "delta.safetensors")), load_file(str(dp / "delta" / "delta.safetensors"))
    assert da.keys() == db.keys()
    for key, value in da.items():
        if key.endswith(".indices"):
            assert torch.equal(db[key], value), key
        else:
            torch.testing.assert_close(db[key], value, rtol=1e-5, atol=1e-6)
    assert "AD-TUNING on ks" in runs["stdout"] and runs["stdout"].count("chosen P=") == 1  # rank 0 prints


def test_cli_reports_world_size_and_allreduce_bytes_per_step(runs):
    summary = json.loads((runs["dp"] / "summary.json").read_text())
    info = summary["data_parallel"]
    assert summary["world_size"] == 2 and info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["global_batch_size"] == 8
    head = info["head_entries"]
    for cand in summary["candidates"]:
        # One fp32 buffer: the k child gradients, the head gradients and the step's loss.
        assert cand["allreduce_bytes_per_step"] == 4 * (cand["k"] + head + 1)
        assert info["allreduce_bytes_per_step"][f"{cand['p']:g}"] == cand["allreduce_bytes_per_step"]
        assert cand["allreduce_bytes_per_step"] < info["ddp_dense_bytes_per_step"]
    assert info["allreduce_steps"] == summary["steps_spent"] and info["collective_seconds"] >= info["allreduce_seconds"] > 0
    assert json.loads((runs["dp"] / "config.json").read_text())["world_size"] == 2
    assert json.loads((runs["single"] / "summary.json").read_text())["world_size"] == 1


def test_cli_resume_under_two_processes_gives_the_uninterrupted_result(runs, tmp_path):
    out = tmp_path / "resumed"
    args = [*SMALL, *runs["data"], "--batch-size", "4", "--output-dir", str(out)]
    stopped = torchrun(args, tmp_path, fault="interrupt")
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr
    assert not (out / "summary.json").exists() and (out / "checkpoint" / "search.json").is_file()
    assert json.loads((out / "checkpoint" / "search.json").read_text())["world_size"] == 2
    done = torchrun([*args, "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = load_file(str(runs["dp"] / "delta" / "delta.safetensors"))
    got = load_file(str(out / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (runs["dp"], out))
    assert a["final"] == b["final"] and [c["train_loss"] for c in a["candidates"]] == [c["train_loss"] for c in b["candidates"]]


def test_resume_with_another_world_size_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(runs["dp"], out)
    assert train.main([*SMALL, *runs["data"], "--batch-size", "4", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "2 process(es)" in err and "this job has 1" in err


def test_search_checkpoint_of_another_world_size_is_refused(tmp_path):
    problem = ToyProblem(8)
    search = AdaptiveSearch(problem, toy_children(problem), toy_config("dense"), progress=False, checkpoint_dir=tmp_path)
    search.save_checkpoint()
    meta = json.loads((tmp_path / "search.json").read_text())
    (tmp_path / "search.json").write_text(json.dumps({**meta, "world_size": 4}))
    with pytest.raises(ValueError, match="checkpointed by 4 process"):
        AdaptiveSearch(problem, toy_children(problem), toy_config("dense"), progress=False, checkpoint_dir=tmp_path).load_checkpoint()


def test_a_failing_rank_takes_the_job_down_with_its_message(runs, tmp_path):
    done = torchrun([*SMALL, *runs["data"], "--batch-size", "4", "--output-dir", str(tmp_path / "failed")], tmp_path,
                    fault="fail-rank-1")
    assert done.returncode != 0
    assert "[rank 1] error: RuntimeError: injected failure on rank 1" in done.stderr
    assert not (tmp_path / "failed" / "summary.json").exists()


def test_bad_data_parallel_flags_are_named(tmp_path, capsys):
    assert train.main(["--dist-timeout", "0", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--dist-timeout" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device cuda:0"):
        resolve_device("cuda:0", local_rank=1, local_world_size=2)
    assert resolve_device("cpu", local_rank=1, local_world_size=2) == torch.device("cpu")
