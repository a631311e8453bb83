"""The AD-TUNING search: pause/continue exactness, one model copy, accounting, resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adtuning import ChildNetwork
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


@pytest.mark.parametrize("stop_at", [3, 11, 27])
def test_resume_after_interruption_gives_the_same_result(tmp_path, stop_at):
    reference_problem = ToyProblem()
    AdaptiveSearch(reference_problem, children_for(reference_problem), config(), progress=False).run()

    def bomb(kind, info, seen=[0]):
        if kind == "train":
            seen[0] += 1
            if seen[0] == stop_at:
                raise Interrupt

    problem = ToyProblem()
    with pytest.raises(Interrupt):
        AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=2), checkpoint_dir=tmp_path, progress=False, on_event=bomb).run()
    resumed_problem = ToyProblem()
    resumed = AdaptiveSearch(resumed_problem, children_for(resumed_problem), config(checkpoint_interval=2), checkpoint_dir=tmp_path, progress=False)
    assert resumed.load_checkpoint()
    resumed.run()
    expected = snapshot(reference_problem)
    for name, value in snapshot(resumed_problem).items():
        assert torch.equal(value, expected[name]), name
    assert len(list(tmp_path.glob("search-*.safetensors"))) == 1


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        SearchConfig(total_steps=10, rungs=(0.1, 0.2), keep=(1,))
    with pytest.raises(ValueError, match="increasing fractions"):
        SearchConfig(total_steps=10, rungs=(0.5, 0.2), keep=(2, 1))
    with pytest.raises(ValueError, match="warmup_steps"):
        SearchConfig(total_steps=10, warmup_steps=11)
    problem = ToyProblem()
    with pytest.raises(ValueError, match="exceeds"):
        AdaptiveSearch(problem, children_for(problem, (0.1,)), config(keep=(2,)), progress=False)
