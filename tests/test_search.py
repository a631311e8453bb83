"""The AD-TUNING search: pause/continue exactness, one model copy, accounting, resume,
regret of the early pick and the head-only / full baselines."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adtuning import ChildNetwork
from adtuning.optim import get_linear_schedule_with_warmup
from adtuning.search import AdaptiveSearch, SearchConfig, successive_halving


class ToyProblem:
    """Classification with a dropout MLP 'upstream' and a linear head; deterministic data."""

    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, seed=0, n_train=48, batch_size=8):
        torch.manual_seed(seed)
        self.upstream = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Dropout(0.2), nn.Linear(17, 17), nn.Tanh())
        self.head = nn.Linear(17, 3)
        self.model = nn.Sequential(self.upstream, self.head)
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n_train, 6, generator=gen)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
        self.dev_x = torch.randn(32, 6, generator=gen)
        self.dev_y = (self.dev_x[:, 0] > 0).long() + (self.dev_x[:, 1] > 0.5).long()
        self.batch_size = batch_size
        self.upstream_params = dict(self.upstream.named_parameters())
        self.head_params = dict(self.head.named_parameters())
        self.batches_served = 0

    def train_batches(self, epoch, skip):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(skip * self.batch_size, len(order), self.batch_size):
            self.batches_served += 1
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def evaluate(self, split):
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.dev_x)
        return {"accuracy": float((logits.argmax(-1) == self.dev_y).float().mean()), "loss": float(F.cross_entropy(logits, self.dev_y))}

    def has_split(self, split):
        return split == "dev"


def children_for(problem, ps=(0.01, 0.1, 0.5)):
    gen = torch.Generator().manual_seed(9)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in problem.upstream_params.items()}
    return ChildNetwork.nested(scores, ps)


def config(**kw):
    base = dict(total_steps=20, rungs=(0.3,), keep=(1,), lr=5e-3, head_lr=1e-2, warmup_steps=4, eval_interval=5, max_grad_norm=1.0, grad_accum=2)
    base.update(kw)
    return SearchConfig(**base)


def snapshot(problem):
    return {n: t.detach().clone() for n, t in problem.model.state_dict().items()}


def test_paused_candidate_continues_exactly_like_an_unpaused_run():
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(), progress=False)
    best = search.run()
    searched = snapshot(problem)

    alone = ToyProblem()
    single = AdaptiveSearch(alone, [children_for(alone)[best.index]], config(rungs=(), keep=()), progress=False)
    single.run()
    for name, value in snapshot(alone).items():
        assert torch.equal(value, searched[name]), name
    assert [loss for _, loss in single.candidates[0].train_losses] == [loss for _, loss in best.train_losses]


def test_step_accounting_and_one_model_copy():
    problem = ToyProblem()
    base = snapshot(problem)
    cfg = config(total_steps=20, rungs=(0.2,), keep=(1,))
    search = AdaptiveSearch(problem, children_for(problem), cfg, progress=False)
    best = search.run()
    assert search.steps_spent() == int((0.2 * 3 + 1 * 0.8) * 20)
    assert search.steps_exhaustive() == 60
    assert [c.status for c in search.candidates].count("finished") == 1
    assert best.status == "finished" and best.step == 20
    # Only the chosen child's entries differ from the base upstream.
    for name, param in problem.upstream_params.items():
        changed = (param.detach().reshape(-1) != base[f"0.{name}"].reshape(-1)).nonzero().flatten()
        allowed = set(best.child.indices.get(name, torch.empty(0, dtype=torch.int32)).tolist())
        assert set(changed.tolist()) <= allowed
    # Swapping everything out restores the base upstream bit for bit.
    search._deactivate()
    for name, param in problem.upstream_params.items():
        assert torch.equal(param.detach(), base[f"0.{name}"])


def test_successive_halving_with_several_rungs_and_survivors():
    rungs, keep = successive_halving(4, eta=2, first_fraction=0.25)
    assert rungs == (0.25, 0.5) and keep == (2, 1)
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem, (0.01, 0.05, 0.1, 0.5)), config(rungs=rungs, keep=keep), progress=False)
    search.run()
    assert sorted(c.step for c in search.candidates) == [5, 5, 10, 20]
    assert successive_halving(3, eta=3, first_fraction=0.2) == ((0.2,), (1,))


class Interrupt(Exception):
    pass


def reference_weights():
    """The weights after an uninterrupted search with :func:`config`."""
    problem = ToyProblem()
    AdaptiveSearch(problem, children_for(problem), config(), progress=False).run()
    return snapshot(problem)


def interrupted_run(checkpoint_dir, stop_at=13):
    """A search checkpointing every 2 steps, interrupted at its ``stop_at``-th training step."""

    def bomb(kind, info, seen=[0]):
        if kind == "train":
            seen[0] += 1
            if seen[0] == stop_at:
                raise Interrupt

    problem = ToyProblem()
    with pytest.raises(Interrupt):
        AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=2), checkpoint_dir=checkpoint_dir,
                       progress=False, on_event=bomb).run()


def resume(checkpoint_dir):
    """Resume the search in ``checkpoint_dir`` on a fresh problem, run it to the end; its weights."""
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=2), checkpoint_dir=checkpoint_dir, progress=False)
    assert search.load_checkpoint()
    search.run()
    return snapshot(problem)


@pytest.mark.parametrize("stop_at", [3, 11, 27])
def test_resume_after_interruption_gives_the_same_result(tmp_path, stop_at):
    expected = reference_weights()
    interrupted_run(tmp_path, stop_at)
    for name, value in resume(tmp_path).items():
        assert torch.equal(value, expected[name]), name
    assert len(list(tmp_path.glob("search-*.safetensors"))) == 2  # two checkpoint generations


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        SearchConfig(total_steps=10, rungs=(0.1, 0.2), keep=(1,))
    with pytest.raises(ValueError, match="increasing fractions"):
        SearchConfig(total_steps=10, rungs=(0.5, 0.2), keep=(2, 1))
    with pytest.raises(ValueError, match="warmup_steps"):
        SearchConfig(total_steps=10, warmup_steps=11)
    for field, value, message in (("lr", -1e-3, "lr must be >= 0"), ("head_lr", float("nan"), "head_lr must be >= 0"),
                                  ("eps", -1.0, "eps must be >= 0"), ("weight_decay", -0.1, "weight_decay must be >= 0"),
                                  ("betas", (0.9, 1.0), r"betas must be two numbers in \[0, 1\)"),
                                  ("betas", (0.9,), "betas must be two numbers"),
                                  ("max_grad_norm", 0.0, "max_grad_norm must be > 0"),
                                  ("eval_interval", -1, "eval_interval must be >= 0"),
                                  ("checkpoint_interval", -5, "checkpoint_interval must be >= 0")):
        with pytest.raises(ValueError, match=message):
            SearchConfig(total_steps=10, **{field: value})
    assert SearchConfig(total_steps=10, betas=[0.8, 0.9]).betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="at least one candidate"):
        SearchConfig(total_steps=10).check_candidates(0)
    problem = ToyProblem()
    with pytest.raises(ValueError, match="exceeds"):
        AdaptiveSearch(problem, children_for(problem, (0.1,)), config(keep=(2,)), progress=False)
    with pytest.raises(ValueError, match="baselines"):
        AdaptiveSearch(problem, children_for(problem), config(), progress=False, baselines=("head-only", "foo"))
    with pytest.raises(RuntimeError, match="run"):
        AdaptiveSearch(problem, children_for(problem), config(), progress=False).measure_regret()


# ---- regret of the early pick --------------------------------------------------------------

class ScriptedProblem(ToyProblem):
    """ToyProblem whose evaluation returns a scripted metric for the active candidate: at the
    rung (step 6 of 20) and at T; 0 elsewhere (the curve points in between)."""

    def __init__(self, rung, final, test=None, higher_is_better=True):
        super().__init__()
        self.rung, self.final, self.test = rung, final, test
        self.higher_is_better = higher_is_better
        self.primary_metric = "accuracy" if higher_is_better else "wer"
        self.search = None

    def evaluate(self, split):
        cand = self.search.active
        script = {6: self.rung, 20: self.final}.get(cand.step, {}) if split == "dev" else self.test
        return {self.primary_metric: script.get(cand.p, 0.0)}

    def has_split(self, split):
        return split == "dev" or self.test is not None


@pytest.mark.parametrize(
    "higher, rung, final, test, regret, best_p, regret_test",
    [
        # The rung leader P=0.01 is also best at T: no regret.
        (True, {0.01: 0.75, 0.1: 0.5, 0.5: 0.25}, {0.01: 0.875, 0.1: 0.75, 0.5: 0.5}, None, 0.0, 0.01, None),
        # P=0.01 leads at the rung, P=0.1 is best at T by 0.25; on test P=0.5 is best by 0.5.
        (True, {0.01: 0.75, 0.1: 0.5, 0.5: 0.25}, {0.01: 0.5, 0.1: 0.75, 0.5: 0.625}, {0.01: 0.375, 0.1: 0.5, 0.5: 0.875}, 0.25, 0.1, 0.5),
        # Lower is better (WER): the same story with the sign flipped, regret still positive.
        (False, {0.01: 0.25, 0.1: 0.5, 0.5: 0.75}, {0.01: 0.5, 0.1: 0.25, 0.5: 0.375}, {0.01: 0.625, 0.1: 0.5, 0.5: 0.125}, 0.25, 0.1, 0.5),
    ],
)
def test_regret_is_the_gap_between_the_pick_and_the_best_at_T(higher, rung, final, test, regret, best_p, regret_test):
    problem = ScriptedProblem(rung, final, test, higher_is_better=higher)
    search = AdaptiveSearch(problem, children_for(problem), config(rungs=(0.3,), keep=(1,)), progress=False)
    problem.search = search
    chosen = search.run()
    assert chosen.p == 0.01
    report = search.measure_regret()
    assert report["regret"] == regret and report["best_p"] == best_p
    assert report["chosen_p"] == 0.01 and report["chosen_dev"] == final[0.01] and report["best_dev"] == final[best_p]
    assert report["regret_test"] == regret_test
    if test is not None:
        assert report["chosen_test"] == test[0.01]
        assert report["best_test"] == (max(test.values()) if higher else min(test.values()))
    assert [c["final_dev"][problem.primary_metric] for c in report["candidates"]] == [final[p] for p in (0.01, 0.1, 0.5)]
    # The search's 6*3 + 14 steps, then the two culled candidates' remaining 14 each.
    assert report["steps_spent_search"] == search.steps_spent() == 32
    assert report["steps_spent_regret"] == search.steps_regret() == 28
    assert [c.status for c in search.candidates] == ["finished", "regret", "regret"]
    assert [c.step for c in search.candidates] == [20, 20, 20] and [c.search_steps for c in search.candidates] == [20, 6, 6]
    assert search.active is chosen


def test_culled_candidates_finish_exactly_like_unpaused_runs_and_the_pick_is_restored():
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(), progress=False)
    best = search.run()
    chosen_state = snapshot(problem)
    search.measure_regret()
    assert search.active is best
    for name, value in snapshot(problem).items():
        assert torch.equal(value, chosen_state[name]), name
    for cand in search.candidates:
        search.apply(cand)
        alone = ToyProblem()
        single = AdaptiveSearch(alone, [children_for(alone)[cand.index]], config(rungs=(), keep=()), progress=False)
        single.run()
        expected = snapshot(alone)
        for name, value in snapshot(problem).items():
            assert torch.equal(value, expected[name]), (cand.p, name)
        assert [loss for _, loss in cand.train_losses] == [loss for _, loss in single.candidates[0].train_losses]


# ---- baselines -----------------------------------------------------------------------------

def plain_adamw_run(problem, cfg, train_upstream):
    """The reference of a baseline: torch.optim.AdamW over the head (and the whole upstream)."""
    torch.set_rng_state(torch.Generator().manual_seed(cfg.seed).get_state())
    upstream = list(problem.upstream_params.values())
    for param in upstream:
        param.requires_grad_(train_upstream)
    groups = [{"params": list(problem.head_params.values()), "lr": cfg.head_lr, "weight_decay": cfg.head_weight_decay}]
    if train_upstream:
        groups.insert(0, {"params": upstream, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    opt = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, foreach=False)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.total_steps)

    def batches():
        epoch = 0
        while True:
            yield from problem.train_batches(epoch, 0)
            epoch += 1

    stream = batches()
    problem.model.train()
    for _ in range(cfg.total_steps):
        for _ in range(cfg.grad_accum):
            (problem.loss(next(stream)) / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return snapshot(problem), problem.evaluate("dev")


def test_baselines_are_head_only_and_full_adamw_under_the_same_schedule(monkeypatch):
    trained = {}
    retire = AdaptiveSearch._retire

    def spy(self, cand):
        trained[cand.baseline] = snapshot(self.problem)
        retire(self, cand)

    monkeypatch.setattr(AdaptiveSearch, "_retire", spy)
    problem = ToyProblem()
    base = snapshot(problem)
    cfg = config(weight_decay=0.01)
    search = AdaptiveSearch(problem, children_for(problem), cfg, progress=False, baselines=("head-only", "full"))
    search.run()
    chosen_state = snapshot(problem)
    report = search.run_baselines()
    # The pick is swapped back in, and the base values under it were restored exactly.
    for name, value in snapshot(problem).items():
        assert torch.equal(value, chosen_state[name]), name

    upstream_entries = sum(p.numel() for p in problem.upstream_params.values())
    head_entries = sum(p.numel() for p in problem.head_params.values())
    assert report["head-only"]["trainable_upstream"] == 0 and report["head-only"]["trainable_head"] == head_entries
    assert report["full"]["trainable_params"] == upstream_entries + head_entries
    assert report["head-only"]["p"] == 0.0 and report["full"]["p"] == 1.0
    for kind, train_upstream in (("head-only", False), ("full", True)):
        assert report[kind]["steps"] == 20 and report[kind]["final_test"] is None
        reference = ToyProblem()
        expected, dev = plain_adamw_run(reference, cfg, train_upstream)
        for name, value in trained[kind].items():
            if name.startswith("0.") and not train_upstream:
                assert torch.equal(value, base[name]), name  # the frozen upstream never moved
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
        assert report[kind]["final_dev"]["accuracy"] == dev["accuracy"]
        assert report[kind]["final_dev"]["loss"] == pytest.approx(dev["loss"], rel=1e-5)
    assert [c.status for c in search.baselines] == ["finished", "finished"]
    assert all(not c.base_values and c.optimizer_state is None for c in search.baselines)


# ---- resume during the comparisons -----------------------------------------------------------

def full_run(problem, checkpoint_dir=None, on_event=None, resume=False):
    search = AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=3), checkpoint_dir=checkpoint_dir,
                            progress=False, on_event=on_event, baselines=("head-only", "full"))
    if resume:
        assert search.load_checkpoint()
    best = search.run()
    regret = search.measure_regret()
    baselines = search.run_baselines()
    search.apply(best)
    return search, regret, baselines


# Train events: 32 in the search, 33-60 regret training, 61-80 head-only, 81-100 full.
@pytest.mark.parametrize("stop_at", [40, 70, 95])
def test_resume_during_regret_or_baselines_gives_the_same_result(tmp_path, stop_at):
    ref_search, ref_regret, ref_baselines = full_run(ToyProblem())
    expected = snapshot(ref_search.problem)

    def bomb(kind, info, seen=[0]):
        if kind == "train":
            seen[0] += 1
            if seen[0] == stop_at:
                raise Interrupt

    with pytest.raises(Interrupt):
        full_run(ToyProblem(), tmp_path, on_event=bomb)
    saved = json.loads((tmp_path / "search.json").read_text())
    if stop_at < 60:
        assert "regret" in [c["status"] for c in saved["candidates"]]
    search, regret, baselines = full_run(ToyProblem(), tmp_path, resume=True)
    assert regret == ref_regret and baselines == ref_baselines
    for name, value in snapshot(search.problem).items():
        assert torch.equal(value, expected[name]), name
    for cand, ref in zip(search.candidates, ref_search.candidates):
        assert cand.train_losses == ref.train_losses and cand.curve == ref.curve


def test_version_1_checkpoints_still_load(tmp_path):
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(), checkpoint_dir=tmp_path, progress=False)
    search.run()
    meta = json.loads((tmp_path / "search.json").read_text())
    meta["version"] = 1
    del meta["baselines"]
    for rec in meta["candidates"]:
        for key in ("stopped_at", "final", "baseline"):
            del rec[key]
    (tmp_path / "search.json").write_text(json.dumps(meta))
    again = ToyProblem()
    resumed = AdaptiveSearch(again, children_for(again), config(), checkpoint_dir=tmp_path, progress=False)
    assert resumed.load_checkpoint()
    assert [c.stopped_at for c in resumed.candidates] == [None if c.status == "finished" else 6 for c in resumed.candidates]
    assert resumed.steps_spent() == search.steps_spent()


# ---- a baseline does not depend on what ran before it ----------------------------------------

def _baseline_outcome(kinds, *, search_first, checkpoint_dir=None, stop_at=None):
    """Train the baselines ``kinds`` (after the search and the regret measurement when
    ``search_first``) on a fresh problem; optionally interrupted at the ``stop_at``-th training
    step and resumed on another fresh problem. Returns, for the "full" baseline, its trained
    model state (taken just before it is retired), train losses, dev curve and final metrics."""
    seen = [0]

    def bomb(kind, info):
        torch.rand(3)  # an event handler that draws random numbers must not shift training
        if kind == "train" and stop_at is not None:
            seen[0] += 1
            if seen[0] == stop_at:
                raise Interrupt

    def attempt(resume):
        problem = ToyProblem()
        trained = {}
        search = AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=3), checkpoint_dir=checkpoint_dir,
                                progress=False, on_event=bomb if not resume else lambda kind, info: torch.rand(2), baselines=kinds)
        retire = search._retire

        def spy(cand):
            trained[cand.baseline] = snapshot(problem)
            retire(cand)

        search._retire = spy
        if resume:
            assert search.load_checkpoint()
        # Prior state a baseline must not depend on: the global RNG, the model's mode.
        torch.manual_seed(12345)
        problem.model.eval()
        if search_first:
            search.run()
            search.measure_regret()
        search.run_baselines()
        full = next(c for c in search.baselines if c.baseline == "full")
        return trained["full"], full.train_losses, full.curve, full.final

    if stop_at is None:
        return attempt(resume=False)
    with pytest.raises(Interrupt):
        attempt(resume=False)
    return attempt(resume=True)


def test_a_baseline_trains_the_same_alone_after_a_search_and_after_a_resume(tmp_path):
    """The "full" baseline gives bit-identical weights, losses, curve and metrics whether it runs
    alone, after the search + regret + head-only baseline, or is killed halfway and resumed."""
    alone = _baseline_outcome(("full",), search_first=False)
    after = _baseline_outcome(("head-only", "full"), search_first=True)
    # Train events: 32 search + 28 regret + 20 head-only, then full: stop at its step 9.
    resumed = _baseline_outcome(("head-only", "full"), search_first=True, checkpoint_dir=tmp_path / "a", stop_at=89)
    resumed_alone = _baseline_outcome(("full",), search_first=False, checkpoint_dir=tmp_path / "b", stop_at=11)
    for other in (after, resumed, resumed_alone):
        weights, losses, curve, final = other
        for name, value in alone[0].items():
            assert torch.equal(value, weights[name]), name
        assert losses == alone[1] and curve == alone[2] and final == alone[3]


def test_a_checkpoint_on_the_cpu_writes_the_live_tensors_without_copying_them(tmp_path, monkeypatch):
    """Memory: the checkpoint of an active candidate (here FT, whose child is every entry) is
    written from the live parameters, head and moments, not from copies of them (on the CPU a
    copy would hold FT's whole state twice while the file is written). The oracle is storage
    identity; the resume tests above show the file is still exact."""
    import adtuning.search as search_module

    problem = ToyProblem()
    cfg = config(total_steps=6, rungs=(), keep=(), checkpoint_interval=3)
    search = AdaptiveSearch(problem, children_for(problem, ps=(0.1,)), cfg, progress=False, baselines=("full",),
                            checkpoint_dir=tmp_path)
    seen: list[tuple[dict[str, int], set[int]]] = []
    write = search_module.write_checkpoint

    def spy(directory, meta, tensors):
        full = search.baselines[0]
        if search.active is full:
            opt = search._live()[0]
            live = {t.untyped_storage().data_ptr() for t in problem.upstream_params.values()}
            live |= {t.untyped_storage().data_ptr() for t in problem.head_params.values()}
            live |= {v.untyped_storage().data_ptr() for s in opt.state_dict()["state"].values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.numel() > 1}
            seen.append(({k: t.untyped_storage().data_ptr() for k, t in tensors.items()}, live))
        return write(directory, meta, tensors)

    monkeypatch.setattr(search_module, "write_checkpoint", spy)
    search.run_baselines()
    assert seen, "no checkpoint was written while FT trained"
    for pointers, live in seen:
        # The full baseline's values, head and moments: every tensor but the RNG states and the
        # scalar step counts (and the paused single candidate's, which is not live).
        big = {k: ptr for k, ptr in pointers.items() if "rng" not in k and "baseline" in k and not k.endswith(".step")}
        assert big, pointers
        copied = [k for k, ptr in big.items() if ptr not in live]
        assert not copied, copied
