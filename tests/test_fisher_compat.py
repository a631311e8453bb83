"""``--fisher-mode published`` reproduces the published AD-TUNING child exactly.

The oracle below is written from the published procedure's description, not from our code:
model in train mode; for every batch the recipe's training loss divided by the
gradient-accumulation steps, ``backward``, ``clip_grad_norm_(param, 1)`` on each scored tensor,
``mask[param] += grad ** 2 / number of batches``, ``zero_grad``; then one flat numpy vector of
all scores, ``polar = np.percentile(r, (1 - p) * 100)`` and ``keep = score >= polar``. It runs
on the same tiny fixture corpora and upstream as the recipe (nothing is downloaded), from the
same random state, and its masks must equal the recipe's children entry for entry (Jaccard 1).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adtuning.train import Recipe, UsageError, build_parser, main, parse_config

sys.path.insert(0, str(Path(__file__).parent / "speech"))
from speech_fixtures import write_librimix, write_librispeech, write_speech_commands  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")]

PS = (0.001, 0.01, 0.1)
FISHER_SEED = 7
TASKS = {
    # task: (corpus writer, extra CLI flags for tiny heads)
    "ks": (write_speech_commands, []),
    "asr": (write_librispeech, ["--task-option", "project_dim=16", "--task-option", "rnn_dim=8"]),
    "sd": (write_librimix, ["--task-option", "chunk_size=150", "--task-option", "hidden_size=8"]),
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("compat-corpora")
    return {task: writer(base / task) for task, (writer, _) in TASKS.items()}


def recipe_for(task, data_dir, out, *extra):
    config = parse_config([
        "--task", task, "--data-dir", str(data_dir), "--upstream", "tiny-wav2vec2", "--output-dir", str(out),
        "--candidates", ",".join(str(p) for p in PS), "--batch-size", "2", "--grad-accum", "2", "--fisher-samples", "5",
        "--steps", "2", "--no-progress", "--no-plots", *TASKS[task][1], *extra,
    ])
    recipe = Recipe(config)
    recipe.setup()
    # The tiny upstreams have no dropout; real ones do (0.1): switch it on, so that train mode
    # (and the random state it draws from) matters for every task, not only ASR's SpecAugment.
    for module in recipe.model.upstream.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return recipe


def published_scored_names(upstream):
    # The published code keeps names containing "encoder.layers" or "layer_norm" of the fairseq
    # model; fairseq's CNN layer norms are named "conv_layers.<i>.2.1", not "layer_norm".
    return [n for n, _ in upstream.named_parameters()
            if ("encoder.layers" in n or "layer_norm" in n) and ".conv_layers." not in n]


def published_masks(recipe, ps):
    """The published procedure, independently: squared clipped batch gradients / batches."""
    model, cfg = recipe.model, recipe.config
    fisher_samples, grad_accum = cfg.fisher.fisher_samples, cfg.optim.grad_accum
    params = dict(model.upstream.named_parameters())
    scored = published_scored_names(model.upstream)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}

    def budgeted(loader):  # whole batches up to --fisher-samples
        seen = 0
        for batch in loader:
            if seen >= fisher_samples:
                return
            yield batch
            seen += len(batch["ids"])

    n_batches = sum(1 for _ in budgeted(recipe.problem.fisher_batches()))
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    mask = {n: torch.zeros_like(params[n]) for n in scored}
    # The loader is read lazily, between forward passes, as the published loop reads it.
    torch.manual_seed(FISHER_SEED)
    for batch in budgeted(recipe.problem.fisher_batches()):
        loss = model.loss(batch) / grad_accum
        loss.backward()
        for name in scored:
            torch.nn.utils.clip_grad_norm_(params[name], 1.0)
            mask[name] += params[name].grad ** 2 / n_batches
        model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    r = np.concatenate([v.detach().reshape(-1).numpy() for v in mask.values()])
    out = []
    for p in ps:
        polar = np.percentile(r, (1 - p) * 100)
        out.append({n: v.detach().reshape(-1).numpy() >= polar for n, v in mask.items()})
    return out, n_batches


def jaccard(child, expected):
    """|A & B| / |A | B| of two entry sets over all tensors."""
    inter = union = 0
    for name, keep in expected.items():
        ours = np.zeros(keep.size, dtype=bool)
        if name in child.indices:
            ours[child.indices[name].numpy()] = True
        inter += int((ours & keep).sum())
        union += int((ours | keep).sum())
    assert set(child.indices) <= set(expected)
    return inter / union


@pytest.mark.parametrize("task", list(TASKS))
def test_published_mode_reproduces_the_published_mask(corpora, tmp_path, task):
    recipe = recipe_for(task, corpora[task], tmp_path / "run", "--fisher-mode", "published")
    # The recipe's pass must not lean on the oracle's order of events: the same seed, then the pass.
    torch.manual_seed(FISHER_SEED)
    recipe.fisher()
    expected, batches = published_masks(recipe, PS)
    assert batches >= 2
    assert recipe.fisher_info["mode"] == "published"
    assert recipe.fisher_info["scored"] == "published" and recipe.fisher_info["count_rule"] == "percentile"
    for child, keep in zip(recipe.children, expected):
        assert set(child.shapes) == set(keep)  # the published scored set
        assert child.k == sum(int(v.sum()) for v in keep.values())
        assert jaccard(child, keep) == 1.0, (task, child.p)


@pytest.mark.parametrize("task", list(TASKS))
def test_published_mode_differs_from_eval_mode_batch_scores(corpora, tmp_path, task):
    # Dropout and SpecAugment on (train mode) change the scores: the preset is not plain batch mode.
    published = recipe_for(task, corpora[task], tmp_path / "a", "--fisher-mode", "published")
    torch.manual_seed(FISHER_SEED)
    published.fisher()
    plain = recipe_for(task, corpora[task], tmp_path / "b", "--fisher-mode", "batch", "--fisher-clip", "1",
                       "--scored", "published", "--child-count", "percentile")
    torch.manual_seed(FISHER_SEED)
    plain.fisher()
    assert plain.fisher_info["summary"] != published.fisher_info["summary"]


def test_scored_and_count_flags_are_checked(corpora, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--scored", "layers.("])
    assert exc.value.code == 2
    assert "argument --scored" in capsys.readouterr().err
    recipe = recipe_for("ks", corpora["ks"], tmp_path / "a", "--scored", "no_such_tensor")
    with pytest.raises(UsageError, match="--scored: 'no_such_tensor' matches no parameter"):
        recipe.fisher()
    with pytest.raises(UsageError, match="--child-count"):
        recipe_for("ks", corpora["ks"], tmp_path / "b", "--child-count", "percentile")


def test_scored_regex_reaches_the_children(corpora, tmp_path):
    recipe = recipe_for("ks", corpora["ks"], tmp_path / "run", "--scored", r"encoder\.layers\.1\.feed_forward")
    recipe.fisher()
    assert all(".encoder.layers.1.feed_forward." in f".{n}" for n in recipe.children[0].shapes)
    assert recipe.children[0].shapes


def test_main_rejects_a_bad_scored_pattern(capsys):
    with pytest.raises(SystemExit):
        main(["--scored", "(", "--no-progress"])
    assert "argument --scored" in capsys.readouterr().err


def test_bernoulli_children_are_drawn_from_the_scored_set(corpora, tmp_path):
    recipe = recipe_for("ks", corpora["ks"], tmp_path / "run", "--child-method", "bernoulli", "--scored", "published",
                        "--child-count", "percentile")  # the count rule does not apply to Bernoulli children
    recipe.fisher()
    assert set(recipe.children[0].shapes) == set(published_scored_names(recipe.model.upstream))
    assert recipe.fisher_info == {"method": "bernoulli", "scored": "published"}
