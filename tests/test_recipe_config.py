"""The typed run configuration: the flag set and defaults of the command line, --config files,
checks that name the flag, and --resume on a folder in which nothing was saved yet."""
from __future__ import annotations

import json

import pytest

from adtuning.recipe import cli
from adtuning.recipe.config import RunConfig, UsageError
from adtuning.recipe.methods import METHOD_NAMES

# The flags of `python -m adtuning.train --help` before the recipe package (adtuning/train.py at
# 18a2bb1), with the default each had: every one keeps its name, destination and default.
FLAGS_BEFORE = {
    "--backend": ("backend", None), "--baselines": ("baselines", ()), "--batch-size": ("batch_size", None),
    "--bf16": ("bf16", False), "--c": ("c", 1), "--candidates": ("candidates", None),
    "--checkpoint-interval": ("checkpoint_interval", 50), "--child-count": ("child_count", None),
    "--child-method": ("child_method", "fisher"), "--corpus-cache": ("corpus_cache", None), "--data-dir": ("data_dir", None),
    "--device": ("device", None), "--dist-timeout": ("dist_timeout", None), "--early-ratio": ("r", 0.2), "--eta": ("eta", None),
    "--eval-batch-size": ("eval_batch_size", None), "--eval-interval": ("eval_interval", None),
    "--fisher-batch-size": ("fisher_batch_size", None), "--fisher-clip": ("fisher_clip", None),
    "--fisher-mode": ("fisher_mode", "per-sample"), "--fisher-samples": ("fisher_samples", 512), "--fused": ("fused", False),
    "--grad-accum": ("grad_accum", 1), "--gradient-checkpointing": ("gradient_checkpointing", False),
    "--head-lr": ("head_lr", None), "--keep": ("keep", None), "--log-level": ("log_level", "INFO"), "--lr": ("lr", None),
    "--max-grad-norm": ("max_grad_norm", 1.0), "--max-nonfinite-skips": ("max_nonfinite_skips", 10),
    "--max-train-hours": ("max_train_hours", None), "--measure-regret": ("measure_regret", False),
    "--no-plots": ("no_plots", False), "--no-progress": ("no_progress", False), "--num-workers": ("num_workers", 0),
    "--on-nonfinite": ("on_nonfinite", "stop"), "--output-dir": ("output_dir", None), "--overwrite": ("overwrite", False),
    "--r": ("r", 0.2), "--resume": ("resume", False), "--rungs": ("rungs", None), "--scored": ("scored", None),
    "--seed": ("seed", 0), "--steps": ("steps", None), "--task": ("task", "ks"), "--task-option": ("task_option", []),
    "--threads": ("threads", None), "--upstream": ("upstream", "adtuning-hubert-mini"), "--warmup-steps": ("warmup_steps", None),
    "--weight-decay": ("weight_decay", 0.0), "--weight-grad": ("weight_grad", "auto"),
}
# (None above: a default that depends on the machine, or was None; checked only where it is fixed.)


def test_every_flag_of_before_keeps_its_name_destination_and_default():
    parser = cli.build_parser()
    actions = {o: a for a in parser._actions for o in a.option_strings}
    missing = sorted(set(FLAGS_BEFORE) - set(actions))
    assert not missing, missing
    defaults = vars(parser.parse_args([]))
    for flag, (dest, default) in FLAGS_BEFORE.items():
        assert actions[flag].dest == dest, flag
        if default is not None:
            assert defaults[dest] == default, flag
    # What was added: the method switch, its options, --fisher-groups, --config and --augment (plus the
    # underscore spellings HfArgumentParser accepts for every hyphenated flag).
    added = {o for o in actions if "_" not in o} - set(FLAGS_BEFORE) - {"-h", "--help"}
    from adtuning.methods import method_option_fields

    method_flags = {f.flag for fields in method_option_fields().values() for f in fields}
    assert {"--lora-rank", "--lora-targets", "--houlsby-bottleneck", "--prefix-length"} <= method_flags
    assert added == {"--method", "--fisher-groups", "--config", "--augment"} | method_flags
    assert defaults["augment"] == 0.0  # off unless asked for
    assert tuple(actions["--method"].choices) == METHOD_NAMES


def test_defaults_are_filled_from_the_task_and_derived_once():
    config = cli.parse_config([])
    assert (config.optim.steps, config.optim.lr, config.optim.batch_size, config.optim.eval_interval) == (300, 5e-3, 32, 60)
    assert config.method.candidates == (0.001, 0.01, 0.1)
    search = config.search_config("reference")
    assert search.total_steps == 300 and search.rungs == (0.2,) and search.keep == (1,) and search.warmup_steps == 15
    assert search.head_lr == 5e-3 and search.max_grad_norm == 1.0
    published = cli.parse_config(["--fisher-mode", "published"]).fisher_settings()
    assert (published.mode, published.clip_norm, published.scored, published.count_rule, published.train_mode) == (
        "batch", 1.0, "published", "percentile", True)
    assert cli.parse_config(["--method", "child-tuning-d"]).method.candidates == (0.1,)
    assert cli.parse_config(["--method", "child-tuning-f", "--candidates", "0.2"]).method.child_method == "bernoulli"


@pytest.mark.parametrize("flags, message", [
    (["--method", "child-tuning-d", "--candidates", "0.1,0.01"], "--candidates: --method child-tuning-d trains one child"),
    (["--lora-rank", "4"], "--lora-rank: applies to --method lora"),
    (["--method", "houlsby", "--lora-rank", "4"], "--lora-rank: applies to --method lora, and this run trains houlsby"),
    (["--prefix-length", "0", "--method", "prefix"], "--prefix-length must be >= 1"),
    (["--method", "lora", "--baselines", "houlsby"], "--baselines: houlsby add modules to the upstream, which --method lora"),
    (["--child-count", "percentile"], "--child-count: percentile is the published rule"),
    (["--warmup-steps", "400"], "--warmup-steps: must be in [0, --steps=300], got 400"),
    (["--resume", "--overwrite"], "--resume: cannot be combined with --overwrite"),
])
def test_checks_name_the_flag(flags, message):
    with pytest.raises(UsageError) as err:
        cli.parse_config(flags)
    assert message in str(err.value)


def test_a_lora_flag_is_accepted_when_a_baseline_is_lora():
    config = cli.parse_config(["--baselines", "lora", "--lora-rank", "4"])
    assert config.method_options("lora") == {"rank": 4} and config.method_options("houlsby") == {}


def test_a_config_file_sets_values_under_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  steps: 40\n  lr: 0.01\ncandidates: [0.01, 0.1]\ntask_option: [a=1]\n")
    config = cli.parse_config(["--config", str(path), "--lr", "0.02"])
    assert config.optim.steps == 40 and config.optim.lr == 0.02 and config.method.candidates == (0.01, 0.1)
    assert config.data.task_options() == {"a": 1}
    flat = tmp_path / "run.json"
    flat.write_text(json.dumps({"args": {**RunConfig().to_json(), "steps": 7}}))
    assert cli.parse_config(["--config", str(flat)]).optim.steps == 7


@pytest.mark.parametrize("text, suffix, message", [
    ("{", ".json", "not valid JSON"),
    ("[1, 2]", ".json", "expected a mapping"),
    ('{"stepz": 3}', ".json", "unknown key 'stepz'"),
    ('{"steps": "many"}', ".json", "steps: expected a number"),
    ('{"fisher_mode": "exact"}', ".json", "fisher_mode: expected one of per-sample, batch, published"),
    ("steps: [", ".yaml", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    assert cli.main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--config: {path}" in err and message in err
    assert not (tmp_path / "out").exists()


def test_resume_on_a_folder_holding_another_kind_of_state_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    assert cli.main(["--resume", "--output-dir", str(out), "--no-progress", "--upstream", "tiny-wav2vec2"]) == 2
    assert "holds checkpoint but no config.json" in capsys.readouterr().err


def test_a_bad_world_size_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert cli.main([]) == 2
    assert "WORLD_SIZE='two' is not an integer" in capsys.readouterr().err
