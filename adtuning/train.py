"""``python -m adtuning.train``: AD-TUNING of a speech SSL upstream on a SUPERB task.

A recipe in six steps — setup, Fisher, search, compare, evaluate, save:

1. **setup** — read the corpus, build the upstream and the task head, fingerprint the base.
2. **Fisher** — one per-sample Fisher pass over training samples; nested child networks for
   every candidate P from one global ranking.
3. **search** — train every candidate for r*T steps on the one model copy, evaluate on dev,
   continue the best c to T (:mod:`adtuning.search`).
4. **compare** (optional) — ``--measure-regret``: train the culled candidates on to T and
   report the regret of the early pick; ``--baselines head-only,full``: train the head alone
   and full fine-tuning under the same schedule. The chosen candidate is swapped back in.
5. **evaluate** — dev (and test when present) metrics of the chosen candidate.
6. **save** — the sparse delta + head, ``summary.json``, the config and PNG plots.

Without ``--data-dir`` it runs the embedded default: keyword spotting on a corpus synthesised
with espeak-ng (cached) and the shipped pre-trained upstream ``adtuning-hubert-mini`` (see
``python -m adtuning.pretrain``) — no downloads, under two minutes on two idle CPU cores.
``--task sid`` and ``--task ic`` without ``--data-dir`` likewise generate a VoxCeleb1-layout and a
Fluent-Speech-Commands-layout corpus (registry: :mod:`adtuning.embedded`).

Under ``torchrun --nproc_per_node W -m adtuning.train ...`` the same recipe runs data parallel
(:mod:`adtuning.distributed`): ``--batch-size B`` is per process and W processes train exactly
like one process with ``--batch-size W*B``; rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from adtuning.atomic import atomic_write
from adtuning.backends import BackendUnavailableError, get_backend, resolve_backend_name
from adtuning.checkpoint import save_delta, weights_fingerprint
from adtuning.child import ChildNetwork
from adtuning.cli_format import DefaultsOnceHelpFormatter
from adtuning.distributed import DEFAULT_TIMEOUT_S, DataParallel
from adtuning.embedded import CORPUS_RUN_DEFAULTS, DEFAULT_CORPUS_CACHE, EMBEDDED_CORPORA, embedded_corpus
from adtuning.fisher import estimate_fisher, fisher_summary
from adtuning.search import BASELINES, AdaptiveSearch, SearchConfig, successive_halving
from adtuning.speech.registry import TASK_NAMES, split_task_options

log = logging.getLogger("adtuning")

DEFAULT_UPSTREAM = "adtuning-hubert-mini"  # adtuning.speech.DEFAULT_UPSTREAM, without importing transformers for --help



class UsageError(Exception):
    """A bad flag or input; reported as one line naming the flag, file or value (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Command line

def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    # Checked against the known names in _check_args, which names the flag and the bad value.
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adtuning.train",
        description="AD-TUNING: Fisher-selected child networks of a speech SSL upstream, with the adaptive early-stop search over P. "
        "Without --data-dir, runs the embedded keyword-spotting default (generated corpus, the shipped pre-trained upstream). "
        "Data parallel on several GPUs or nodes: torchrun --nproc_per_node W -m adtuning.train ... (batch sizes are per process).",
        formatter_class=DefaultsOnceHelpFormatter,
    )
    g = parser.add_argument_group("task and data")
    g.add_argument("--task", default="ks", choices=TASK_NAMES, help="SUPERB task")
    g.add_argument("--data-dir", type=Path, default=None, help="corpus root in its standard layout (default: generate the task's embedded corpus; ks, sid and ic have one)")
    g.add_argument("--corpus-cache", type=Path, default=DEFAULT_CORPUS_CACHE, help="where the embedded corpus is generated and cached")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset/task option (repeatable), e.g. lexicon=/path/lexicon.txt for pr; values are parsed as JSON when possible")
    g.add_argument("--max-train-hours", type=float, default=None, help="train on a fixed random subset of this many hours (low-resource runs)")
    g.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")

    g = parser.add_argument_group("upstream")
    g.add_argument("--upstream", default=DEFAULT_UPSTREAM,
                   help=f"hub id (already cached), local directory, the shipped pre-trained {DEFAULT_UPSTREAM}, "
                        "or a random test config: tiny-wav2vec2 / tiny-hubert / tiny-wavlm")
    g.add_argument("--bf16", action="store_true", help="bf16 upstream weights (child entries keep an fp32 master copy)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute transformer layers in backward")

    g = parser.add_argument_group("AD-TUNING search")
    g.add_argument("--candidates", type=_floats, default=(0.001, 0.01, 0.1), help="child ratios P to search over")
    g.add_argument("--r", "--early-ratio", dest="r", type=float, default=0.2,
                   help="early training ratio: candidates are compared after r*T steps (under torchrun write --early-ratio: "
                        "torchrun's own parser takes --r for an abbreviation of its --rdzv-* flags)")
    g.add_argument("--c", type=int, default=1, help="how many candidates continue to T steps")
    g.add_argument("--rungs", type=_floats, default=None, help="several rungs (fractions of T); overrides --r (needs --keep)")
    g.add_argument("--keep", type=_ints, default=None, help="survivors after each of --rungs")
    g.add_argument("--eta", type=float, default=None, help="successive halving with this reduction factor, first rung at --r, down to --c survivors")
    g.add_argument("--child-method", choices=["fisher", "bernoulli"], default="fisher", help="CHILD-TUNING_D (Fisher) or CHILD-TUNING_F (Bernoulli)")
    g.add_argument("--measure-regret", action="store_true",
                   help="after the search, train every culled candidate on from where it stopped to T and report the regret of the "
                        "early pick: how much worse the chosen's dev metric at T is than the best candidate's (0: the pick was "
                        "best); costs only their remaining steps")
    g.add_argument("--baselines", type=_names, default=(), metavar="KIND[,KIND]",
                   help="also train, under the same schedule, seed and data order: head-only (P=0, frozen upstream) and/or "
                        "full (P=1: every scored upstream entry, AdamW); comma-separated")

    from adtuning.fisher import SCORED_SETS, check_scored_choice

    def scored_choice(value: str) -> str:
        try:
            return check_scored_choice(value)
        except ValueError as err:  # argparse names the flag: "argument --scored: ..."
            raise argparse.ArgumentTypeError(str(err)) from None

    g = parser.add_argument_group("Fisher pass")
    g.add_argument("--fisher-samples", type=int, default=512,
                   help="training samples used for the Fisher pass (in total, over all processes; --fisher-mode batch/published "
                        "use whole batches, up to the one that reaches it)")
    g.add_argument("--fisher-mode", choices=["per-sample", "batch", "published"], default="per-sample",
                   help="per-sample: eq. 6, the mean of squared per-sample NLL gradients, model in eval mode. batch: the "
                        "published code's scores, the mean over batches of the squared gradient of the recipe's training loss "
                        "divided by --grad-accum, eval mode. published: the published AD-TUNING code at once: batch, model in "
                        "train mode (dropout, SpecAugment), per-tensor clip 1.0 (--fisher-clip), the published scored set "
                        "(--scored) and the percentile count rule (--child-count)")
    g.add_argument("--fisher-batch-size", type=int, default=None, help="batch size of the Fisher pass, per process (default: --batch-size)")
    g.add_argument("--fisher-clip", type=float, default=None,
                   help="per-tensor gradient norm clip (clip_grad_norm_ on each tensor) of --fisher-mode batch/published "
                        "(unset, %(default)s: none for batch, 1.0 for published)")
    g.add_argument("--scored", type=scored_choice, default=None, metavar="|".join(SCORED_SETS) + "|REGEX",
                   help="upstream parameters the child is chosen from: default (the transformer encoder layers), published "
                        "(the published code's: encoder layers plus the feature-projection and encoder layer norms), "
                        "encoder-layers, or a regular expression searched in each parameter name (unset, %(default)s: published with "
                        "--fisher-mode published, else default)")
    g.add_argument("--child-count", choices=["round", "percentile"], default=None,
                   help="how many entries a Fisher child keeps: round (the top round(P*N), ties broken by order) or percentile "
                        "(the published rule: every score >= numpy.percentile(scores, (1-P)*100), i.e. 1+floor(P*(N-1)) plus "
                        "ties; --fisher-mode batch/published only) (unset, %(default)s: percentile with --fisher-mode published, else round)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="T: optimizer steps of a full run (default: 300 on the embedded corpus, 150 with --data-dir)")
    g.add_argument("--lr", type=float, default=None, help="learning rate of the child entries (default: 5e-3 on the embedded corpus, 1e-3 with --data-dir)")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the head and layer weights (default: --lr)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the child entries")
    g.add_argument("--batch-size", type=int, default=None,
                   help="utterances per micro-batch and process (default: 32 on the embedded corpus, 16 with --data-dir); under "
                        "torchrun with W processes each takes its part of a global batch of W*B, the same optimisation as "
                        "--batch-size W*B on one process")
    g.add_argument("--eval-batch-size", type=int, default=None, help="utterances per evaluation batch and process (default: --batch-size)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--eval-interval", type=int, default=None, help="dev evaluation every N steps for the curves (default: T/5 on the embedded corpus, T/10 with --data-dir; 0: only at rungs)")

    g = parser.add_argument_group("engine")
    g.add_argument("--fused", action="store_true", help="fused kernels: Triton on CUDA, native C++ on CPU (same as --backend fused)")
    g.add_argument("--backend", choices=["reference", "native", "triton", "fused"], default=None,
                   help="kernel backend for the Fisher pass, the optimizer and sparse weight gradients (default: the fused "
                        "one of the device when it loads, else reference)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--weight-grad", choices=["auto", "dense", "sparse"], default="auto",
                   help="Linear weight gradients: only the child entries (SDDMM into the optimizer's compact buffers), "
                        "dense GEMM then gather, or auto (per tensor, by child density and the backend's measured threshold)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; on a 2-core machine that is shared with other "
                        "jobs, 1 can be faster)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and dropout")
    g.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                   help="a training step whose loss or gradient is NaN/inf is never applied: stop the run with a message "
                        "naming the candidate, step and utterances (default), or skip the step (logged and counted in "
                        "summary.json) until --max-nonfinite-skips come in a row")
    g.add_argument("--max-nonfinite-skips", type=int, default=10, help="with --on-nonfinite skip: consecutive skipped steps that stop the run")

    g = parser.add_argument_group("data parallel (under torchrun)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others in a collective before the job fails (it must exceed the "
                        "generation of an embedded corpus, which rank 0 does alone)")

    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("outputs/adtuning"), help="run folder (config, summary.json, delta, plots, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --output-dir")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds a run")
    g.add_argument("--checkpoint-interval", type=int, default=50, help="write a resumable checkpoint every N steps (segment ends always)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _apply_run_defaults(args: argparse.Namespace) -> None:
    """Fill --steps/--lr/--batch-size/--eval-interval left unset with the task's embedded-run
    defaults (no --data-dir) or those for a real corpus."""
    if args.data_dir is not None:
        defaults = CORPUS_RUN_DEFAULTS.as_dict()
    else:  # a task without an embedded corpus is refused by _check_args
        defaults = EMBEDDED_CORPORA.get(args.task, embedded_corpus("ks")).run_defaults.as_dict()
    for flag in ("steps", "lr", "batch_size"):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[flag])
    if args.eval_interval is None and args.steps >= 1:
        args.eval_interval = max(1, args.steps // defaults["eval_fraction"])


def _check_args(args: argparse.Namespace) -> None:
    def bad(flag: str, why: str):
        raise UsageError(f"{flag}: {why}")

    if not args.candidates:
        bad("--candidates", "at least one P is needed")
    for p in args.candidates:
        if not 0 < p <= 1:
            bad("--candidates", f"every P must be in (0, 1], got {p}")
    if len(set(args.candidates)) != len(args.candidates):
        bad("--candidates", f"duplicate values in {args.candidates}")
    if args.steps < 1:
        bad("--steps", f"must be >= 1, got {args.steps}")
    if args.max_nonfinite_skips < 1:
        bad("--max-nonfinite-skips", f"must be >= 1, got {args.max_nonfinite_skips}")
    if not 0 < args.r < 1:
        bad("--r", f"must be in (0, 1), got {args.r}")
    if not 1 <= args.c <= len(args.candidates):
        bad("--c", f"must be between 1 and the number of candidates ({len(args.candidates)}), got {args.c}")
    if (args.rungs is None) != (args.keep is None):
        bad("--rungs/--keep", "give both or neither")
    if args.rungs is not None and args.eta is not None:
        bad("--eta", "cannot be combined with --rungs/--keep")
    if args.threads is not None and args.threads < 1:
        bad("--threads", f"must be >= 1, got {args.threads}")
    for flag in ("batch_size", "grad_accum", "fisher_samples"):
        if getattr(args, flag) < 1:
            bad("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("lr", "weight_decay"):
        if getattr(args, flag) < 0:
            bad("--" + flag.replace("_", "-"), f"must be >= 0, got {getattr(args, flag)}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        bad("--warmup-steps", f"must be in [0, --steps={args.steps}], got {args.warmup_steps}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        bad("--data-dir", f"{args.data_dir} is not a directory")
    if args.data_dir is None and args.task not in EMBEDDED_CORPORA:
        bad("--data-dir", f"task {args.task!r} needs its corpus; only {', '.join(EMBEDDED_CORPORA)} have an embedded default")
    if args.resume and args.overwrite:
        bad("--resume", "cannot be combined with --overwrite")
    if not args.dist_timeout > 0:
        bad("--dist-timeout", f"must be > 0 seconds, got {args.dist_timeout}")
    for flag in ("eval_batch_size", "fisher_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            bad("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    if args.fused and args.backend not in (None, "fused"):
        bad("--fused", f"conflicts with --backend {args.backend}")
    for kind in args.baselines:
        if kind not in BASELINES:
            bad("--baselines", f"unknown baseline {kind!r} (choose from {', '.join(BASELINES)})")
    if len(set(args.baselines)) != len(args.baselines):
        bad("--baselines", f"duplicate values in {','.join(args.baselines)}")


def _task_options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--task-option: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


# ---------------------------------------------------------------------------------------------
# The problem the search trains

class SpeechProblem:
    """Adapts a :class:`adtuning.speech.SpeechModel` and its loaders to the search.

    Data parallel (``dp`` given): loaders plan the global batches (``W`` times the per-process
    batch sizes) and yield this rank's part; :meth:`loss` returns this rank's share of the
    global batch's loss and :meth:`evaluate` the metrics of the whole split.
    """

    def __init__(self, model, train_set, dev_set, test_set, args, dp: DataParallel | None = None):
        from adtuning.speech import make_loader

        self.model = model
        self.dp = dp
        self.world_size = 1 if dp is None else dp.world_size
        self._shard = None if dp is None else (dp.rank, dp.world_size)
        self.train_set, self.dev_set, self.test_set = train_set, dev_set, test_set
        self.upstream_params = dict(model.upstream.named_parameters())
        self.head_params = dict(model.task.named_parameters())
        self.primary_metric = model.primary_metric
        self.higher_is_better = model.higher_is_better
        self._make_loader = make_loader
        self.args = args

    def train_batches(self, epoch: int, skip: int):
        return iter(self._make_loader(
            self.train_set, self.args.batch_size * self.world_size, shuffle=True, seed=self.args.seed, epoch=epoch,
            skip_batches=skip, max_hours=self.args.max_train_hours, num_workers=self.args.num_workers, shard=self._shard,
        ))

    def fisher_batches(self):
        """The Fisher pass's batches (data parallel: this rank's parts, cut to ``--fisher-samples``
        in total before sharding, since ``estimate_fisher`` cannot count other ranks' samples)."""
        return self._make_loader(
            self.train_set, (self.args.fisher_batch_size or self.args.batch_size) * self.world_size, shuffle=True,
            seed=self.args.seed + 1, epoch=0, balanced=False, max_hours=self.args.max_train_hours,
            num_workers=self.args.num_workers, shard=self._shard,
            max_items=None if self.dp is None else self.args.fisher_samples,
        )

    def loss(self, batch):
        if self.dp is None:
            return self.model.loss(batch)
        share = self._loss_share(batch)
        return None if batch is None else self.model.loss(batch) * share

    def _loss_share(self, batch) -> float:
        """This rank's weight in the global batch's loss: the fraction of the loss's normaliser
        it holds. Every recipe loss is a mean over samples except SD's, a mean over label
        frames, whose global count takes one scalar all-reduce."""
        if self.args.task == "sd":
            frames = torch.zeros((), dtype=torch.float64, device=self.dp.device)
            if batch is not None:
                frames += float(batch["label_lengths"].sum())
            mine = float(frames)
            total = float(self.dp.all_reduce_sum_(frames))
            return mine / total
        if batch is None:
            return 0.0
        return len(batch["ids"]) / batch["global_batch_size"]

    def has_split(self, split: str) -> bool:
        return (self.dev_set if split == "dev" else self.test_set) is not None

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.dev_set if split == "dev" else self.test_set
        batch_size = (self.args.eval_batch_size or self.args.batch_size) * self.world_size
        loader = self._make_loader(dataset, batch_size, shuffle=False, seed=self.args.seed, num_workers=self.args.num_workers,
                                   shard=self._shard)
        if self.dp is None:
            return self.model.evaluate(loader, progress=not self.args.no_progress)
        return self._evaluate_sharded(loader)

    @torch.no_grad()
    def _evaluate_sharded(self, loader) -> dict[str, float]:
        """This rank's part of the split through the task's accumulator, merged over the ranks
        (counts summed, hypotheses concatenated), then the metric of the whole split."""
        from adtuning.speech.model import batch_to

        model, task = self.model, self.model.task
        was_training = model.training
        model.eval()
        try:
            state = task.new_eval_state()
            for batch in loader:
                if batch is None:
                    continue
                batch = batch_to(batch, model.device)
                task.eval_update(state, model(batch), batch)
        finally:
            model.train(was_training)
        return task.eval_compute(self.dp.merge_eval_states(state))


# ---------------------------------------------------------------------------------------------
# The recipe

class Recipe:
    """setup -> fisher -> search -> evaluate -> save, driven by parsed CLI arguments."""

    def __init__(self, args: argparse.Namespace, dp: DataParallel | None = None):
        self.args = args
        self.dp = dp
        self.is_main = dp is None or dp.is_main
        self.world_size = 1 if dp is None else dp.world_size
        self.out: Path = args.output_dir
        self.started = time.time()
        self.summary: dict[str, Any] = {}
        self.regret: dict[str, Any] | None = None
        self.baselines: dict[str, dict] | None = None
        self.writer = None

    # 1. setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        args, dp = self.args, self.dp
        if dp is None:
            self._prepare_output_dir()
            self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        else:
            # Rank 0 owns the run folder; a refusal there is raised on every rank.
            dp.run_on_main(self._prepare_output_dir)
            self.device = dp.device
            log.info("%s", dp.describe())
        self.backend, why = self._choose_backend()
        log.info("backend: %s (device %s; %s)", self.backend, self.device, why)
        threads, why = choose_threads(args.threads)
        torch.set_num_threads(threads)
        log.info("torch threads: %d (%s)", threads, why)

        from adtuning.speech import SpeechModel, build_dataset, build_task, build_upstream

        data_dir = args.data_dir
        self.task_options = _task_options(args.task_option)
        if data_dir is None:
            data_dir = self._embedded_corpus() if dp is None else dp.staged(self._embedded_corpus)
            # The embedded corpus's reader/head options (e.g. PR's lexicon, ASR's head size) under
            # the ones given with --task-option; the delta records the result, so export rebuilds
            # the same head.
            self.task_options = {**embedded_corpus(args.task).resolved_task_options(data_dir), **self.task_options}
            log.info("task options: %s", ", ".join(f"{k}={v!r}" for k, v in self.task_options.items()) or "none")
        dataset_options, task_options = split_task_options(args.task, self.task_options)
        self.train_set = build_dataset(args.task, data_dir, "train", **dataset_options)
        self.dev_set = build_dataset(args.task, data_dir, "dev", **dataset_options)
        self.test_set = _optional_split(build_dataset, args.task, data_dir, dataset_options)
        log.info("data: %s train / %s dev / %s test utterances from %s", len(self.train_set), len(self.dev_set),
                 len(self.test_set) if self.test_set is not None else "no", data_dir)

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        upstream = build_upstream(args.upstream, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
        self.base_fingerprint = weights_fingerprint(dict(upstream.named_parameters()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            task = build_task(args.task, upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers,
                              **{**getattr(self.train_set, "task_kwargs", {}), **task_options})
        self.model = SpeechModel(upstream, task).to(self.device)
        if dp is not None:
            # Every rank built the same base model and head from the seed; make sure before training.
            dp.check_replicas({f"head {n}": p for n, p in task.named_parameters()}, "the initial heads")
            fingerprints = dp.all_gather_object(self.base_fingerprint)
            if len(set(fingerprints)) != 1:
                raise RuntimeError(f"data parallel: the ranks loaded different upstreams (fingerprints {fingerprints})")
        self.problem = SpeechProblem(self.model, self.train_set, self.dev_set, self.test_set, args, dp)
        self.upstream_entries = sum(p.numel() for p in upstream.parameters())
        self.scored_names = list(upstream.default_scored_parameters())
        self.data_dir = data_dir
        self._write_config()
        self._open_tensorboard()

    def _choose_backend(self) -> tuple[str, str]:
        """The kernel backend and why: the one asked for, else the fused one of the device when it
        loads (the reference backend is for tests and for checking), else the reference."""
        args = self.args
        if args.fused or args.backend:
            flag = "--fused" if args.fused else "--backend"
            name = resolve_backend_name("fused" if args.fused else args.backend, self.device)
            try:
                get_backend(name, self.device)
            except BackendUnavailableError as err:
                raise UsageError(f"{flag}: backend {name!r} is not available: {err}") from err
            return name, f"asked for with {flag}"
        try:
            name = resolve_backend_name("fused", self.device)
            get_backend(name, self.device)
        except BackendUnavailableError as err:
            log.warning("the fused backend is not available (%s); using the reference backend (pure PyTorch, slower)", err)
            return "reference", "the fused backend is not available"
        return name, "the fused backend of this device, the default; --backend reference for the pure-PyTorch path"

    def _prepare_output_dir(self) -> None:
        args, out = self.args, self.out
        has_run = (out / "config.json").is_file()
        if has_run and not (args.resume or args.overwrite):
            raise UsageError(f"--output-dir: {out} already holds a run; pass --resume to continue it or --overwrite to start afresh")
        if args.resume and not has_run:
            raise UsageError(f"--resume: {out} holds no run to continue (no config.json)")
        if args.resume:
            config = json.loads((out / "config.json").read_text())
            saved_world = int(config.get("world_size", 1))
            if saved_world != self.world_size:
                raise UsageError(f"--resume: {out} was run by {saved_world} process(es) and this job has {self.world_size}; "
                                 f"resume with the same world size (torchrun --nnodes x --nproc_per_node = {saved_world}), since "
                                 "each process's data shard and random stream depend on it")
            saved = config["args"]
            current = _comparable_args(args)
            # A flag added after the run was started counts as given at its default.
            defaults = _comparable_args(build_parser().parse_args([]))
            saved = {k: saved.get(k, defaults.get(k)) for k in current}
            changed = {k: (saved[k], v) for k, v in current.items() if saved[k] != v}
            if changed:
                raise UsageError("--resume: these flags differ from the interrupted run: "
                                 + ", ".join(f"{k} (was {a!r}, now {b!r})" for k, (a, b) in changed.items()))
        if args.overwrite and out.exists():
            for sub in ("checkpoint", "children", "delta"):
                for f in (out / sub).glob("*") if (out / sub).is_dir() else ():
                    f.unlink()
        out.mkdir(parents=True, exist_ok=True)

    def _embedded_corpus(self) -> Path:
        corpus = embedded_corpus(self.args.task)
        log.info("embedded default: %s corpus synthesised with espeak-ng (cached in %s)",
                 corpus.what, (self.args.corpus_cache / corpus.folder).parent)
        return corpus.generate(self.args.corpus_cache, progress=not self.args.no_progress)

    def _write_config(self) -> None:
        config = {"args": _comparable_args(self.args), "base_model": self.args.upstream, "base_fingerprint": self.base_fingerprint,
                  "data_dir": str(self.data_dir), "backend": self.backend, "device": str(self.device),
                  "world_size": self.world_size}
        if not self.args.resume and self.is_main:
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))

    def _open_tensorboard(self) -> None:
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.out / "tensorboard"))

    # 2. Fisher ------------------------------------------------------------------------------
    def fisher(self) -> None:
        args = self.args
        children_dir = self.out / "children"
        # No dot in the stem: ChildNetwork.save takes "p0.01" for stem "p0" and suffix ".01".
        paths = [children_dir / (f"p{p:g}".replace(".", "_") + ".safetensors") for p in args.candidates]
        upstream_params = self.problem.upstream_params
        dp = self.dp
        # --fisher-mode published is a preset: batch scores in train mode, clip 1.0, the published
        # scored set and count rule; explicit --fisher-clip/--scored/--child-count override it.
        from adtuning.fisher import choose_scored_names

        published = args.fisher_mode == "published"
        mode = "batch" if published else args.fisher_mode
        clip_norm = args.fisher_clip if args.fisher_clip is not None else (1.0 if published else None)
        scored_choice = args.scored or ("published" if published else "default")
        count_rule = args.child_count or ("percentile" if published else "round")
        if count_rule == "percentile" and mode == "per-sample" and args.child_method == "fisher":
            raise UsageError("--child-count: percentile is the published rule for --fisher-mode batch/published; "
                             "per-sample scores keep round(P*N)")
        try:
            scored_names = choose_scored_names(scored_choice, upstream_params, self.scored_names)
        except ValueError as err:
            raise UsageError(f"--scored: {err}") from None

        def load_saved():
            if not (args.resume and all(p.is_file() for p in paths)):
                return None
            return [ChildNetwork.load(p, upstream_params) for p in paths], json.loads((children_dir / "fisher.json").read_text())

        saved = load_saved() if dp is None else dp.run_on_main(load_saved)
        if saved is not None:
            self.children, self.fisher_info = saved
            if dp is not None:
                self.children = dp.broadcast_children(self.children)
            log.info("resume: loaded %d child networks from %s", len(self.children), children_dir)
            return
        start = time.perf_counter()
        if args.child_method == "bernoulli":
            scored = {n: upstream_params[n] for n in scored_names}
            self.children = [ChildNetwork.bernoulli(scored, p, seed=args.seed) for p in args.candidates]
            self.fisher_info = {"method": "bernoulli", "scored": scored_choice}
        else:
            if mode == "per-sample":
                def objective(model, batch, fisher_pass):
                    # The model adapter reports frame lengths to the pass (padding skipped in backward).
                    return None if batch is None else model.per_sample_nll(batch, fisher_pass.note_sample_lengths)

                batches, max_samples = self.problem.fisher_batches(), args.fisher_samples if dp is None else None
            else:
                def objective(model, batch, fisher_pass):
                    # The recipe's training loss of a micro-batch (this rank's share under data parallel:
                    # problem.loss joins the SD normaliser's all-reduce even for an empty part).
                    loss = self.problem.loss(batch)
                    return None if loss is None else loss / args.grad_accum

                def whole_batches(batches, budget):
                    # A batch loss cannot be cut: whole batches up to the one reaching the budget.
                    seen = 0
                    for batch in batches:
                        if seen >= budget:
                            return
                        yield batch
                        seen += len(batch["ids"])

                batches, max_samples = self.problem.fisher_batches(), None
                if dp is None:  # under data parallel the sharded loader already holds --fisher-samples
                    batches = whole_batches(batches, args.fisher_samples)
            # Data parallel: each rank scores its part of the --fisher-samples; the sums are
            # all-reduced inside, so every rank returns the scores of all of them.
            scores = estimate_fisher(
                self.model, batches, objective,
                params=[f"upstream.{n}" for n in scored_names], mode=mode, backend=self.backend,
                max_samples=max_samples, clip_norm=clip_norm, train_mode=args.fisher_mode == "published",
                progress=not args.no_progress and self.is_main, data_parallel=dp,
            )
            scores = {name[len("upstream."):]: value for name, value in scores.items()}
            self.children = ChildNetwork.nested(scores, args.candidates, count_rule=count_rule) if self.is_main else None
            self.fisher_info = {"method": "fisher", "mode": args.fisher_mode, "scored": scored_choice,
                                "count_rule": count_rule, "clip": clip_norm}
            if self.is_main:
                from adtuning.plots import log_score_histogram

                self.fisher_info.update(summary=fisher_summary(scores), histogram=log_score_histogram(scores),
                                        seconds=time.perf_counter() - start)
            del scores
        if dp is not None:
            # Every rank trains rank 0's index sets: identical children by construction.
            self.children = dp.broadcast_children(self.children)
        if not self.is_main:
            return
        for child, path in zip(self.children, paths):
            child.save(path)
        atomic_write(children_dir / "fisher.json", lambda tmp: Path(tmp).write_text(json.dumps(self.fisher_info)))
        for child in self.children:
            log.info("P=%g  trainable params: %s || all upstream params: %s || trainable%%: %.4f  (threshold %s)",
                     child.p, f"{child.k:,}", f"{self.upstream_entries:,}", 100.0 * child.k / self.upstream_entries,
                     "n/a" if child.threshold is None else f"{child.threshold:.3e}")

    # 3. search ------------------------------------------------------------------------------
    def search(self) -> None:
        args = self.args
        if args.rungs is not None:
            rungs, keep = args.rungs, args.keep
        elif args.eta is not None:
            rungs, keep = successive_halving(len(args.candidates), args.eta, args.r, args.c)
        else:
            rungs, keep = (args.r,), (args.c,)
        eval_interval = args.eval_interval
        self.config = SearchConfig(
            total_steps=args.steps, rungs=rungs, keep=keep, lr=args.lr, head_lr=args.head_lr or args.lr,
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else int(0.05 * args.steps),
            weight_decay=args.weight_decay, grad_accum=args.grad_accum,
            max_grad_norm=args.max_grad_norm or None, eval_interval=eval_interval, backend=self.backend, seed=args.seed,
            checkpoint_interval=args.checkpoint_interval, weight_grad=args.weight_grad,
            on_nonfinite=args.on_nonfinite, max_nonfinite_skips=args.max_nonfinite_skips,
        )
        self.searcher = AdaptiveSearch(self.problem, self.children, self.config, checkpoint_dir=self.out / "checkpoint",
                                       progress=not args.no_progress and self.is_main, on_event=self._event,
                                       baselines=args.baselines, data_parallel=self.dp)
        if args.resume:
            self.searcher.load_checkpoint()
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.best = self.searcher.run()
        log.info("chose P=%g after %d steps (exhaustive search: %d)", self.best.p, self.searcher.steps_spent(), self.searcher.steps_exhaustive())

    def _event(self, kind: str, info: dict) -> None:
        if self.writer is None:
            return
        tag = f"P={info.get('p', 0):g}"
        if kind == "train":
            self.writer.add_scalar(f"train_loss/{tag}", info["loss"], info["step"])
            self.writer.add_scalar(f"lr/{tag}", info["lr"], info["step"])
        elif kind == "dev":
            for key, value in info.items():
                if key not in ("candidate", "p", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"dev_{key}/{tag}", value, info["step"])

    # 4. compare -----------------------------------------------------------------------------
    def compare(self) -> None:
        """Regret of the early pick and baselines, when asked for; the chosen candidate ends swapped in."""
        args = self.args
        self.regret = self.searcher.measure_regret() if args.measure_regret else None
        if self.regret is not None:
            r = self.regret
            log.info("regret %.4f (dev %s: best at T P=%g %.4f, chosen P=%g %.4f); %d extra steps", r["regret"], r["metric"],
                     r["best_p"], r["best_dev"], r["chosen_p"], r["chosen_dev"], r["steps_spent_regret"])
        self.baselines = self.searcher.run_baselines() if args.baselines else None

    # 5. evaluate ----------------------------------------------------------------------------
    def evaluate(self) -> None:
        self.searcher.apply(self.best)
        rng = torch.get_rng_state()
        self.final = {"dev": self.problem.evaluate("dev")}
        if self.problem.has_split("test"):
            self.final["test"] = self.problem.evaluate("test")
        torch.set_rng_state(rng)
        for split, metrics in self.final.items():
            log.info("final %s (P=%g): %s", split, self.best.p, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # 6. save --------------------------------------------------------------------------------
    def save(self) -> dict | None:
        """Rank 0 writes the delta, summary.json and the plots and returns the summary; other
        ranks write nothing and return ``None``."""
        args, best = self.args, self.best
        if not self.is_main:
            if self.writer is not None:
                self.writer.close()
            return None
        delta_dir = save_delta(
            self.out / "delta", self.problem.upstream_params, best.child, self.problem.head_params,
            {"base_model": args.upstream, "base_fingerprint": self.base_fingerprint, "base_dtype": "bfloat16" if args.bf16 else "float32",
             "base_seed": args.seed, "task": args.task, "task_options": self.task_options,
             "task_kwargs": _jsonable(getattr(self.train_set, "task_kwargs", {})), "metrics": self.final},
        )
        rung_steps = self.config.rung_steps()
        candidates = []
        for cand in self.searcher.candidates:
            entry = {
                "p": cand.p, "k": cand.child.k, "trainable_percent": 100.0 * cand.child.k / self.upstream_entries,
                "threshold": cand.child.threshold, "steps": cand.step, "search_steps": cand.search_steps, "status": cand.status,
                "dev_at_rungs": {str(rung_steps[i]): m for i, m in sorted(cand.rung_metrics.items())},
                "curve": cand.curve, "train_loss": cand.train_losses,
                "layer_ratios": cand.child.layer_ratios(),
                "allreduce_bytes_per_step": self.searcher.allreduce_bytes_per_step(cand),
                "skipped_nonfinite_steps": cand.skipped_steps,
            }
            if self.regret is not None:
                entry.update(final_dev=cand.final["dev"], final_test=cand.final.get("test"))
            candidates.append(entry)
        self.summary = {
            "task": args.task, "upstream": args.upstream, "base_fingerprint": self.base_fingerprint,
            "primary_metric": self.problem.primary_metric, "higher_is_better": self.problem.higher_is_better,
            "candidates": candidates, "chosen_p": best.p, "chosen_k": best.child.k, "final": self.final,
            "steps_spent": self.searcher.steps_spent(), "steps_exhaustive": self.searcher.steps_exhaustive(),
            "steps_spent_search": self.searcher.steps_spent(), "steps_spent_regret": self.searcher.steps_regret(),
            "rungs": list(self.config.rungs), "keep": list(self.config.keep), "total_steps": self.config.total_steps,
            "swap_seconds": self.searcher.swap_seconds, "train_seconds": self.searcher.train_seconds,
            "eval_seconds": self.searcher.eval_seconds, "wall_seconds": time.time() - self.started,
            "peak_memory": _peak_memory(self.device), "backend": self.backend, "device": str(self.device),
            "fisher": {k: v for k, v in self.fisher_info.items() if k != "histogram"},
            "delta_dir": str(delta_dir), "delta_bytes": sum(f.stat().st_size for f in delta_dir.iterdir()),
            "versions": _versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "world_size": self.world_size, "data_parallel": self._data_parallel_summary(),
        }
        if self.regret is not None:
            # regret (dev) is the headline; regret_test only when the task has a test split.
            self.summary["regret"] = self.regret["regret"]
            if self.regret["regret_test"] is not None:
                self.summary["regret_test"] = self.regret["regret_test"]
            self.summary["regret_detail"] = {k: v for k, v in self.regret.items() if k not in ("candidates", "regret", "regret_test")}
        if self.baselines is not None:
            self.summary["baselines"] = {kind: {**info, "trainable_percent": 100.0 * info["trainable_upstream"] / self.upstream_entries}
                                         for kind, info in self.baselines.items()}
        if not args.no_plots:
            self.summary["plots"] = self._plots()
        atomic_write(self.out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(self.summary, indent=2)))
        if self.writer is not None:
            self.writer.close()
        return self.summary

    def _data_parallel_summary(self) -> dict | None:
        """What data parallelism cost: bytes all-reduced per step (per candidate), next to what
        torch DDP all-reduces for the same trainable tensors (the dense gradient of every scored
        upstream entry plus the head, ``4 * (N + head)``: full fine-tuning, and CHILD-TUNING's
        masked dense gradient alike), and time in the gradient all-reduces and in all collectives."""
        if self.dp is None:
            return None
        head = sum(p.numel() for p in self.problem.head_params.values())
        scored = self.children[0].n
        return {
            "backend": self.dp.backend, "world_size": self.world_size,
            "global_batch_size": self.args.batch_size * self.world_size * self.args.grad_accum,
            "head_entries": head,
            "allreduce_bytes_per_step": {f"{c.p:g}": self.searcher.allreduce_bytes_per_step(c) for c in self.searcher.candidates},
            "scored_entries": scored, "ddp_dense_bytes_per_step": 4 * (scored + head),
            "allreduce_steps": self.searcher.allreduce_steps, "allreduce_seconds": self.searcher.allreduce_seconds,
            "collective_seconds": self.dp.collective_seconds,
        }

    def _plots(self) -> list[str]:
        from adtuning import plots

        files = []
        metric = self.problem.primary_metric
        if "histogram" in self.fisher_info:
            thresholds = {c.p: c.threshold for c in self.children}
            files.append(plots.plot_fisher_distribution(self.fisher_info["histogram"], thresholds, self.out / "fisher_distribution.png",
                                                        title=f"Fisher scores ({self.args.task})"))
        curves = {c.p: c.curve for c in self.searcher.candidates}
        files.append(plots.plot_candidate_curves(curves, metric, self.out / "candidate_curves.png", self.config.rung_steps()[:-1],
                                                 title=f"{self.args.task}: dev {metric} per candidate"))
        files.append(plots.plot_layer_ratios({c.p: c.layer_ratios() for c in self.children}, self.out / "layer_ratios.png"))
        return [str(f) for f in files]


def choose_threads(requested: int | None) -> tuple[int, str]:
    """The torch CPU thread count of a run and why: ``--threads`` when given, else torch's
    default (one per core). Measured on an idle 2-core machine, the embedded default ran in 82 s
    with two threads and 128 s with one; on a machine busy with other jobs one thread can win,
    which is what ``--threads 1`` is for."""
    if requested is not None:
        return requested, "--threads"
    return torch.get_num_threads(), "torch default: one per core; --threads to change"


def _optional_split(build_dataset, task, data_dir, options):
    """The test split, or ``None`` when the corpus has none (its folder or list is absent or
    lists nothing). A test split that is there but broken is an error, never taken for absence."""
    from adtuning.speech import MissingDataError

    try:
        return build_dataset(task, data_dir, "test", **options)
    except MissingDataError as err:
        log.info("no test split (%s)", err)
        return None


def _comparable_args(args: argparse.Namespace) -> dict:
    """The flags that define a run (what --resume must not change)."""
    # The non-finite policy may change on resume: a run stopped by a NaN can go on skipping.
    skip = {"resume", "overwrite", "no_progress", "no_plots", "log_level", "num_workers", "checkpoint_interval", "threads",
            "dist_timeout", "on_nonfinite", "max_nonfinite_skips"}
    return {k: _jsonable(v) for k, v in vars(args).items() if k not in skip}


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _peak_memory(device: torch.device) -> dict:
    info = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        info["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return info


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "torchaudio"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


def _print_summary(summary: dict) -> None:
    metric = summary["primary_metric"]
    measured = "regret" in summary
    has_test = measured and all(c["final_test"] is not None for c in summary["candidates"])
    at_t = (f"  {'at T: dev':>10}" + (f" {'test':>7}" if has_test else "")) if measured else ""
    print(f"\nAD-TUNING on {summary['task']} with {summary['upstream']} (backend {summary['backend']})")
    print(f"{'P':>8} {'k':>10} {'% upstream':>11} {'steps':>6}{at_t}  dev {metric} at rungs")
    for c in summary["candidates"]:
        rungs = ", ".join(f"{step}: {m[metric]:.4f}" for step, m in c["dev_at_rungs"].items())
        final = ""
        if measured:
            final = f"  {c['final_dev'][metric]:>10.4f}" + (f" {c['final_test'][metric]:>7.4f}" if has_test else "")
        print(f"{c['p']:>8g} {c['k']:>10,} {c['trainable_percent']:>10.3f}% {c['search_steps']:>6}{final}  {rungs}")
    final = ", ".join(f"{split} {metric}={m[metric]:.4f}" for split, m in summary["final"].items())
    print(f"chosen P={summary['chosen_p']:g}: {final}")
    print(f"steps spent {summary['steps_spent']} vs {summary['steps_exhaustive']} for training every candidate; "
          f"swap time {summary['swap_seconds']:.2f}s; wall {summary['wall_seconds']:.0f}s")
    if measured:
        print(_regret_line(summary))
    for kind, b in summary.get("baselines", {}).items():
        scores = ", ".join(f"{split} {metric}={b[f'final_{split}'][metric]:.4f}" for split in ("dev", "test") if b[f"final_{split}"] is not None)
        print(f"baseline {kind} (P={b['p']:g}: {b['trainable_upstream']:,} upstream + {b['trainable_head']:,} head parameters trained, "
              f"{b['steps']} steps): {scores}")
    print(f"sparse delta: {summary['delta_dir']} ({summary['delta_bytes'] / 1024:.1f} KiB)")


def _regret_line(summary: dict) -> str:
    """One line: the regret on dev (and test), who was best at T, and what the comparison cost."""
    d = summary["regret_detail"]
    line = (f"regret {summary['regret']:.4f} (dev {d['metric']}; best at T: P={d['best_p']:g} {d['best_dev']:.4f}, "
            f"chosen P={d['chosen_p']:g} {d['chosen_dev']:.4f})")
    if "regret_test" in summary:
        line += (f"; on test {summary['regret_test']:.4f} (best at T: P={d['best_test_p']:g} {d['best_test']:.4f}, "
                 f"chosen {d['chosen_test']:.4f})")
    return line + f"; comparison cost {summary['steps_spent_regret']} extra steps"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns the process exit code (0 ok, 2 usage/input error, 1 failure).

    Under torchrun every process runs this; a process that fails prints its error with its
    rank and exits, and torchrun stops the others.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK") if _launched_world() > 1 else None
    where = "" if rank is None else f"[rank {rank}] "
    level = getattr(logging, args.log_level)
    if rank not in (None, "0") and level < logging.WARNING:
        level = logging.WARNING  # one copy of the log: rank 0's
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {where}%(message)s", datefmt="%H:%M:%S")
    dp = None
    try:
        _apply_run_defaults(args)
        _check_args(args)
        try:
            dp = DataParallel.from_env(args.device, args.dist_timeout)
        except ValueError as err:
            raise UsageError(str(err)) from err
        recipe = Recipe(args, dp)
        # Log lines go through tqdm.write, so they never cut a progress bar in two.
        with logging_redirect_tqdm():
            recipe.setup()
            recipe.fisher()
            recipe.search()
            recipe.compare()
            recipe.evaluate()
            summary = recipe.save()
    except UsageError as err:
        # Usage errors are raised alike on every rank (rank 0's checks are broadcast).
        if dp is not None:
            dp.close()
        print(f"{where}error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        # Possibly this rank alone: leave the group as it is (the others may be inside a
        # collective) and exit; torchrun then stops the other ranks.
        print(f"{where}error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if dp is not None:
        dp.barrier()  # nobody tears down its connections while rank 0 may still be saving
        dp.close()
    if summary is not None:
        _print_summary(summary)
    return 0


def _launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
