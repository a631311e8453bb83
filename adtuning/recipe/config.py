"""The typed run configuration of ``python -m adtuning.train``: one dataclass per concern.

Every command-line flag is one field of one of these dataclasses; its help text lives on the
field (``metadata["help"]``) and :mod:`adtuning.recipe.cli` generates the parser from them with
``transformers.HfArgumentParser``. Each dataclass checks its own fields once, in
``__post_init__``; :class:`RunConfig` fills the task-dependent defaults and checks what spans
several concerns. The search's :class:`~adtuning.search.SearchConfig` and the Fisher settings are
derived from a checked configuration (:meth:`RunConfig.search_config`,
:meth:`RunConfig.fisher_settings`) and never checked again by the recipe.

A bad value raises :class:`ConfigError` whose message starts with the flag
(``--candidates: every P must be in (0, 1], got 2.0``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adtuning.distributed import DEFAULT_TIMEOUT_S
from adtuning.embedded import CORPUS_RUN_DEFAULTS, DEFAULT_CORPUS_CACHE, EMBEDDED_CORPORA, embedded_corpus
from adtuning.recipe.methods import BASELINE_NAMES, METHOD_NAMES, canonical_method
from adtuning.recipe.types import FisherGroups, Floats, Ints, Names, ScoredChoice
from adtuning.speech.registry import TASK_NAMES
from adtuning.speech.upstream import DEFAULT_UPSTREAM  # the one definition (transformers is imported lazily there)

DEFAULT_CANDIDATES = (0.001, 0.01, 0.1)


class UsageError(ValueError):
    """A bad flag, configuration value or input; reported as one line naming the flag, file or
    value (exit status 2), with nothing written."""


ConfigError = UsageError


def flag(default: Any = None, help: str = "", **argparse_kwargs: Any) -> Any:
    """A configuration field: its default and its command-line help (extra argparse options
    such as ``choices``, ``metavar`` or ``aliases`` go to the generated parser)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def _bad(flag_name: str, why: str) -> UsageError:
    return UsageError(f"{flag_name}: {why}")


def _at_least(flag_name: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise _bad(flag_name, f"must be >= {low:g}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Which task, which corpus, how it is read."""

    _argument_group_name = "task and data"

    task: str = flag("ks", "SUPERB task", choices=TASK_NAMES)
    data_dir: Path | None = flag(None, "corpus root in its standard layout (default: generate the task's embedded corpus)")
    corpus_cache: Path = flag(DEFAULT_CORPUS_CACHE, "where the embedded corpus is generated and cached")
    task_option: list[str] = field(default_factory=list, metadata={
        "help": "extra dataset/task option (repeatable), e.g. lexicon=/path/lexicon.txt for pr; values are parsed as JSON when possible",
        "metavar": "KEY=VALUE", "action": "extend"})
    max_train_hours: float | None = flag(None, "train on a fixed random subset of this many hours (low-resource runs)")
    num_workers: int = flag(0, "data loader worker processes")
    augment: float = flag(0.0, "probability scale of on-the-fly augmentation of the training clips, the v2 upstream's "
                               "pre-training pipeline (noise, babble, simulated rooms, speed, pitch, band-limiting, gain); 0: off")

    def __post_init__(self) -> None:
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise _bad("--data-dir", f"{self.data_dir} is not a directory")
        if self.data_dir is None and self.task not in EMBEDDED_CORPORA:
            raise _bad("--data-dir", f"task {self.task!r} needs its corpus; only {', '.join(EMBEDDED_CORPORA)} have an embedded default")
        for pair in self.task_option:
            if "=" not in pair:
                raise _bad("--task-option", f"expected KEY=VALUE, got {pair!r}")
        _at_least("--num-workers", self.num_workers, 0)
        if self.max_train_hours is not None and not self.max_train_hours > 0:
            raise _bad("--max-train-hours", f"must be > 0, got {self.max_train_hours}")
        if not 0.0 <= self.augment <= 1.0:
            raise _bad("--augment", f"must be in [0, 1], got {self.augment}")

    def task_options(self) -> dict[str, Any]:
        """``--task-option KEY=VALUE`` pairs, values parsed as JSON when they are JSON."""
        import json

        options: dict[str, Any] = {}
        for pair in self.task_option:
            key, value = pair.split("=", 1)
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value
        return options


@dataclass(frozen=True)
class UpstreamConfig:
    """The pre-trained model that is fine-tuned."""

    _argument_group_name = "upstream"

    upstream: str = flag(DEFAULT_UPSTREAM, f"hub id (already cached), local directory, the shipped pre-trained {DEFAULT_UPSTREAM}, "
                                           "or a random test config: tiny-wav2vec2 / tiny-hubert / tiny-wavlm")
    bf16: bool = flag(False, "bf16 upstream weights (child entries keep an fp32 master copy)")
    gradient_checkpointing: bool = flag(False, "recompute transformer layers in backward")


@dataclass(frozen=True)
class MethodConfig:
    """What is trained: the method, and for AD-TUNING the search over P."""

    _argument_group_name = "method and AD-TUNING search"

    method: str = flag("ad-tuning", "what is trained (the rows of the paper's Table 2): " + ", ".join(METHOD_NAMES)
                       + "; see docs/methods.md", choices=METHOD_NAMES)
    candidates: Floats | None = flag(None, "child ratios P to search over (default 0.001,0.01,0.1; child-tuning-d/-f: "
                                           "one P, default 0.1)")
    r: float = flag(0.2, "early training ratio: candidates are compared after r*T steps (under torchrun write --early-ratio: "
                         "torchrun's own parser takes --r for an abbreviation of its --rdzv-* flags)", aliases=["--early-ratio"])
    c: int = flag(1, "how many candidates continue to T steps")
    rungs: Floats | None = flag(None, "several rungs (fractions of T); overrides --r (needs --keep)")
    keep: Ints | None = flag(None, "survivors after each of --rungs")
    eta: float | None = flag(None, "successive halving with this reduction factor, first rung at --r, down to --c survivors")
    child_method: Literal["fisher", "bernoulli"] = flag("fisher", "CHILD-TUNING_D (Fisher) or CHILD-TUNING_F (Bernoulli)")
    measure_regret: bool = flag(False, "after the search, train every culled candidate on from where it stopped to T and report "
                                       "the regret of the early pick: how much worse the chosen's dev metric at T is than the best "
                                       "candidate's (0: the pick was best); costs only their remaining steps")
    baselines: Names = flag(Names(), "also train, under the same schedule, seed and data order, these methods (comma-separated "
                                     "--method names; head-only is weighted-sum)", metavar="METHOD[,METHOD]")

    def __post_init__(self) -> None:
        method = canonical_method(self.method)
        if method is None:
            raise _bad("--method", f"unknown method {self.method!r} (choose from {', '.join(METHOD_NAMES)})")
        if method == "child-tuning-f" and self.child_method == "fisher":
            object.__setattr__(self, "child_method", "bernoulli")
        elif self.child_method == "bernoulli" and method == "child-tuning-d":
            raise _bad("--child-method", "bernoulli is CHILD-TUNING_F; --method child-tuning-d chooses the child by Fisher")
        from adtuning.recipe.methods import METHODS

        kind = METHODS[method].kind
        if kind not in ("search", "child"):
            given = [flag for flag, value, default in (("--candidates", self.candidates, None), ("--rungs", self.rungs, None),
                                                       ("--keep", self.keep, None), ("--eta", self.eta, None), ("--c", self.c, 1),
                                                       ("--measure-regret", self.measure_regret, False),
                                                       ("--child-method", self.child_method, "fisher")) if value != default]
            if given:
                raise _bad(given[0], f"does not apply to --method {method}, which trains no child network (it has no P to search)")
        elif kind == "child" and self.measure_regret:
            raise _bad("--measure-regret", f"--method {method} trains one child: there is no pick to measure")
        candidates = self.candidates
        if candidates is None:
            candidates = Floats((0.1,)) if method in ("child-tuning-d", "child-tuning-f") else Floats(DEFAULT_CANDIDATES)
        object.__setattr__(self, "candidates", candidates)
        if not candidates:
            raise _bad("--candidates", "at least one P is needed")
        for p in candidates:
            if not 0 < p <= 1:
                raise _bad("--candidates", f"every P must be in (0, 1], got {p}")
        if len(set(candidates)) != len(candidates):
            raise _bad("--candidates", f"duplicate values in {tuple(candidates)}")
        if method in ("child-tuning-d", "child-tuning-f") and len(candidates) != 1:
            raise _bad("--candidates", f"--method {method} trains one child; give one P (got {','.join(f'{p:g}' for p in candidates)})")
        if not 0 < self.r < 1:
            raise _bad("--r", f"must be in (0, 1), got {self.r}")
        if not 1 <= self.c <= len(candidates):
            raise _bad("--c", f"must be between 1 and the number of candidates ({len(candidates)}), got {self.c}")
        if (self.rungs is None) != (self.keep is None):
            raise _bad("--rungs/--keep", "give both or neither")
        if self.rungs is not None and self.eta is not None:
            raise _bad("--eta", "cannot be combined with --rungs/--keep")
        for kind in self.baselines:
            if kind not in BASELINE_NAMES:
                raise _bad("--baselines", f"unknown baseline {kind!r} (choose from {', '.join(BASELINE_NAMES)})")
        if len(set(self.baselines)) != len(self.baselines):
            raise _bad("--baselines", f"duplicate values in {','.join(self.baselines)}")
        added = [b for b in self.baselines if METHODS[canonical_method(b) or b].kind == "module"]
        if added and METHODS[method].kind == "module":
            raise _bad("--baselines", f"{', '.join(added)} add modules to the upstream, which --method {method} already has; "
                                      "train them as baselines of a method that adds none (e.g. ad-tuning), or as runs of their own")

    @property
    def searches(self) -> bool:
        """Whether the run trains child networks of the upstream (AD-TUNING or CHILD-TUNING)."""
        return canonical_method(self.method) in ("ad-tuning", "child-tuning-d", "child-tuning-f")

    def plan(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The search's rungs (fractions of T) and survivors after each."""
        from adtuning.search import successive_halving

        assert self.candidates is not None
        if self.rungs is not None and self.keep is not None:
            return tuple(self.rungs), tuple(self.keep)
        if self.eta is not None:
            return successive_halving(len(self.candidates), self.eta, self.r, self.c)
        return (self.r,), (self.c,)


@dataclass(frozen=True)
class FisherSettings:
    """The Fisher pass as it runs, after the ``--fisher-mode published`` preset is applied."""

    mode: str  # "per-sample" or "batch"
    clip_norm: float | None
    scored: str
    count_rule: str
    train_mode: bool
    groups: int | None  # None: auto


@dataclass(frozen=True)
class FisherConfig:
    """The Fisher pass that scores the upstream's entries."""

    _argument_group_name = "Fisher pass"

    fisher_samples: int = flag(512, "training samples used for the Fisher pass (in total, over all processes; --fisher-mode "
                                    "batch/published use whole batches, up to the one that reaches it)")
    fisher_mode: Literal["per-sample", "batch", "published"] = flag(
        "per-sample", "per-sample: eq. 6, the mean of squared per-sample NLL gradients, model in eval mode. batch: the published "
        "code's scores, the mean over batches of the squared gradient of the recipe's training loss divided by --grad-accum, eval "
        "mode. published: the published AD-TUNING code at once: batch, model in train mode (dropout, SpecAugment), per-tensor clip "
        "1.0 (--fisher-clip), the published scored set (--scored) and the percentile count rule (--child-count)")
    fisher_batch_size: int | None = flag(None, "batch size of the Fisher pass, per process (default: --batch-size)")
    fisher_clip: float | None = flag(None, "per-tensor gradient norm clip (clip_grad_norm_ on each tensor) of --fisher-mode "
                                           "batch/published (unset, %(default)s: none for batch, 1.0 for published)")
    scored: ScoredChoice | None = flag(None, "upstream parameters the child is chosen from: default (the transformer encoder "
                                             "layers), published (the published code's: encoder layers plus the feature-projection and "
                                             "encoder layer norms), encoder-layers, or a regular expression searched in each "
                                             "parameter name (unset, %(default)s: published with --fisher-mode published, else default)",
                                       metavar="default|published|encoder-layers|REGEX")
    child_count: Literal["round", "percentile"] | None = flag(
        None, "how many entries a Fisher child keeps: round (the top round(P*N), ties broken by order) or percentile (the published "
        "rule: every score >= numpy.percentile(scores, (1-P)*100), i.e. 1+floor(P*(N-1)) plus ties; --fisher-mode batch/published "
        "only) (unset, %(default)s: percentile with --fisher-mode published, else round)")
    fisher_groups: FisherGroups = flag(FisherGroups("1"), "score 1/G of the scored tensors per pass over the Fisher samples (G "
                                                          "passes, the same scores; holds the scores of one group at a time), or "
                                                          "auto: the smallest G that keeps the pass within the training phase's memory",
                                       metavar="G|auto")

    def __post_init__(self) -> None:
        _at_least("--fisher-samples", self.fisher_samples, 1)
        _at_least("--fisher-batch-size", self.fisher_batch_size, 1)
        if self.fisher_clip is not None and not self.fisher_clip > 0:
            raise _bad("--fisher-clip", f"must be > 0, got {self.fisher_clip}")

    def settings(self) -> FisherSettings:
        published = self.fisher_mode == "published"
        return FisherSettings(
            mode="batch" if published else self.fisher_mode,
            clip_norm=self.fisher_clip if self.fisher_clip is not None else (1.0 if published else None),
            scored=self.scored or ("published" if published else "default"),
            count_rule=self.child_count or ("percentile" if published else "round"),
            train_mode=published,
            groups=FisherGroups(self.fisher_groups).count,
        )


@dataclass(frozen=True)
class OptimConfig:
    """The schedule and the optimizer (unset values: the task's defaults, see :class:`RunConfig`)."""

    _argument_group_name = "optimisation"

    steps: int | None = flag(None, "T: optimizer steps of a full run (default: 300 on the embedded corpus, 150 with --data-dir)")
    lr: float | None = flag(None, "learning rate of the child entries (default: 5e-3 on the embedded corpus, 1e-3 with --data-dir)")
    head_lr: float | None = flag(None, "learning rate of the head and layer weights (default: --lr)")
    warmup_steps: int | None = flag(None, "linear warm-up steps (default: 5%% of --steps)")
    weight_decay: float = flag(0.0, "decoupled weight decay of the child entries")
    batch_size: int | None = flag(None, "utterances per micro-batch and process (default: 32 on the embedded corpus, 16 with "
                                        "--data-dir); under torchrun with W processes each takes its part of a global batch of W*B, "
                                        "the same optimisation as --batch-size W*B on one process")
    eval_batch_size: int | None = flag(None, "utterances per evaluation batch and process (default: --batch-size)")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    max_grad_norm: float = flag(1.0, "global gradient-norm clip (0: off)")
    eval_interval: int | None = flag(None, "dev evaluation every N steps for the curves (default: T/5 on the embedded corpus, T/10 "
                                           "with --data-dir; 0: only at rungs)")

    def __post_init__(self) -> None:
        _at_least("--steps", self.steps, 1)
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            _at_least("--" + name.replace("_", "-"), getattr(self, name), 1)
        for name in ("lr", "weight_decay", "head_lr", "max_grad_norm"):
            _at_least("--" + name.replace("_", "-"), getattr(self, name), 0)
        _at_least("--eval-interval", self.eval_interval, 0)
        if self.warmup_steps is not None and self.steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise _bad("--warmup-steps", f"must be in [0, --steps={self.steps}], got {self.warmup_steps}")


@dataclass(frozen=True)
class EngineConfig:
    """Kernels, device, threads, seed and what a non-finite step does."""

    _argument_group_name = "engine"

    fused: bool = flag(False, "fused kernels: Triton on CUDA, native C++ on CPU (same as --backend fused)")
    backend: Literal["reference", "native", "triton", "fused"] | None = flag(
        None, "kernel backend for the Fisher pass, the optimizer and sparse weight gradients (default: the fused one of the device "
        "when it loads, else reference)")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    weight_grad: Literal["auto", "dense", "sparse"] = flag(
        "auto", "Linear weight gradients: only the child entries (SDDMM into the compact gradient buffers), dense GEMM then gather, "
        "or auto (per tensor, by child density and the backend's measured threshold)")
    threads: int | None = flag(None, "torch CPU threads (default: torch's, one per core; on a 2-core machine that is shared with "
                                     "other jobs, 1 can be faster)")
    seed: int = flag(0, "seed of initialisation, data order and dropout")
    on_nonfinite: Literal["stop", "skip"] = flag(
        "stop", "a training step whose loss or gradient is NaN/inf is never applied: stop the run with a message naming the "
        "candidate, step and utterances (default), or skip the step (logged and counted in summary.json) until "
        "--max-nonfinite-skips come in a row")
    max_nonfinite_skips: int = flag(10, "with --on-nonfinite skip: consecutive skipped steps that stop the run")
    dist_timeout: float = flag(DEFAULT_TIMEOUT_S, "seconds a process waits for the others in a collective before the job fails (it "
                                                  "must exceed the generation of an embedded corpus, which rank 0 does alone)")

    def __post_init__(self) -> None:
        _at_least("--threads", self.threads, 1)
        _at_least("--max-nonfinite-skips", self.max_nonfinite_skips, 1)
        if not self.dist_timeout > 0:
            raise _bad("--dist-timeout", f"must be > 0 seconds, got {self.dist_timeout}")
        if self.fused and self.backend not in (None, "fused"):
            raise _bad("--fused", f"conflicts with --backend {self.backend}")

    @property
    def requested_backend(self) -> str | None:
        """``fused`` for ``--fused``, else ``--backend`` (``None``: not asked for)."""
        return "fused" if self.fused else self.backend


@dataclass(frozen=True)
class OutputConfig:
    """The run folder and what is written and shown."""

    _argument_group_name = "output"

    output_dir: Path = flag(Path("outputs/adtuning"), "run folder (config, summary.json, delta, plots, checkpoints)")
    resume: bool = flag(False, "continue the interrupted run in --output-dir (a folder with nothing saved yet: start it)")
    overwrite: bool = flag(False, "start afresh even if --output-dir holds a run")
    checkpoint_interval: int = flag(50, "write a resumable checkpoint every N steps (segment ends always)")
    no_plots: bool = flag(False, "skip the PNG plots")
    no_progress: bool = flag(False, "no progress bars")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = flag("INFO", "log level")

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise _bad("--resume", "cannot be combined with --overwrite")
        _at_least("--checkpoint-interval", self.checkpoint_interval, 0)


def _method_options_type() -> tuple[Any, dict[str, tuple[str, str]]]:
    """The options of the module-adding methods as one configuration group, generated from each
    method's own options dataclass (:func:`adtuning.methods.method_option_fields`): a field
    ``<method>_<option>`` (flag ``--<method>-<option>``, e.g. ``--lora-rank``) per option, unset by
    default (the method's default applies)."""
    from adtuning.methods import method_option_fields

    fields: list[tuple[str, Any, Any]] = []
    applies: dict[str, tuple[str, str]] = {}
    for method, options in method_option_fields().items():
        for opt in options:
            name = opt.flag[2:].replace("-", "_")
            kind = Names if opt.type is tuple else opt.type
            default = ",".join(opt.default) if isinstance(opt.default, tuple) else opt.default
            fields.append((name, kind | None, flag(None, f"{opt.help} (--method {method}; unset: {default})",
                                                   **({"metavar": "NAME[,NAME]"} if opt.type is tuple else {}))))
            applies[name] = (method, opt.name)

    def given(self: Any) -> dict[str, Any]:
        """The options set (not ``None``), by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    cls = dataclasses.make_dataclass("MethodOptions", fields, frozen=True, namespace={
        "given": given, "_argument_group_name": "options of the Table 2 methods",
        "__doc__": _method_options_type.__doc__, "__module__": __name__})
    return cls, applies


MethodOptions: Any
METHOD_OPTION_FIELDS: dict[str, tuple[str, str]]
MethodOptions, METHOD_OPTION_FIELDS = _method_options_type()
"""``MethodOptions``: the group of method options; ``METHOD_OPTION_FIELDS``: field name ->
(method, the option's name in that method's options)."""

GROUPS: tuple[type, ...] = (DataConfig, UpstreamConfig, MethodConfig, MethodOptions, FisherConfig, OptimConfig, EngineConfig,
                            OutputConfig)
"""The configuration's concerns, in ``--help`` order; :class:`RunConfig` has one field per group."""

GROUP_FIELDS = ("data", "upstream", "method", "options", "fisher", "optim", "engine", "output")

#: Fields that do not define a run: they may differ when it is resumed or re-run.
NON_DEFINING = frozenset({"resume", "overwrite", "no_progress", "no_plots", "log_level", "num_workers", "checkpoint_interval",
                          "threads", "dist_timeout", "on_nonfinite", "max_nonfinite_skips"})


@dataclass(frozen=True)
class RunConfig:
    """One run's whole configuration: a checked instance of every group, with the task's defaults
    filled in (``--steps``, ``--lr``, ``--batch-size``, ``--eval-interval``)."""

    data: DataConfig = field(default_factory=DataConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    options: Any = field(default_factory=MethodOptions)  # a MethodOptions (generated from the methods' options)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.data.data_dir is not None:
            defaults = CORPUS_RUN_DEFAULTS.as_dict()
        else:
            defaults = EMBEDDED_CORPORA.get(self.data.task, embedded_corpus("ks")).run_defaults.as_dict()
        optim = self.optim
        filled = {name: defaults[name] for name in ("steps", "lr", "batch_size") if getattr(optim, name) is None}
        steps = filled.get("steps", optim.steps)
        if optim.eval_interval is None:
            filled["eval_interval"] = max(1, steps // defaults["eval_fraction"])
        if filled:
            object.__setattr__(self, "optim", dataclasses.replace(optim, **filled))
        used = self.methods_used()
        for name in self.options.given():
            method = METHOD_OPTION_FIELDS[name][0]
            if method not in used:
                raise _bad("--" + name.replace("_", "-"), f"applies to --method {method}, and this run trains {', '.join(sorted(used))}")
        for method in used & set(m for m, _ in METHOD_OPTION_FIELDS.values()):
            from adtuning.methods import method_spec

            try:
                method_spec(method).parse_options(self.method_options(method))
            except ValueError as err:
                raise UsageError(str(err)) from None
        fisher = self.fisher.settings()
        if fisher.count_rule == "percentile" and fisher.mode == "per-sample" and self.method.child_method == "fisher":
            raise _bad("--child-count", "percentile is the published rule for --fisher-mode batch/published; per-sample scores keep "
                                        "round(P*N)")

    # ---- derived settings -------------------------------------------------------------------

    def methods_used(self) -> set[str]:
        """The run's method and its baselines' (registered names)."""
        names = {canonical_method(self.method.method)} | {canonical_method(b) for b in self.method.baselines}
        return {n for n in names if n is not None}

    def method_options(self, method: str) -> dict[str, Any]:
        """The options given for ``method``, by the method's option names (``{"rank": 4}``), as JSON values."""
        return {METHOD_OPTION_FIELDS[k][1]: jsonable(v) for k, v in self.options.given().items() if METHOD_OPTION_FIELDS[k][0] == method}

    def fisher_settings(self) -> FisherSettings:
        return self.fisher.settings()

    def search_config(self, backend: str) -> Any:
        """The :class:`adtuning.search.SearchConfig` of this run with kernel backend ``backend``."""
        from adtuning.search import SearchConfig

        o, e = self.optim, self.engine
        assert o.steps is not None and o.lr is not None
        rungs, keep = self.method.plan()
        return SearchConfig(
            total_steps=o.steps, rungs=rungs, keep=keep, lr=o.lr, head_lr=o.head_lr or o.lr,
            warmup_steps=o.warmup_steps if o.warmup_steps is not None else int(0.05 * o.steps),
            weight_decay=o.weight_decay, grad_accum=o.grad_accum, max_grad_norm=o.max_grad_norm or None,
            eval_interval=o.eval_interval or 0, backend=backend, seed=e.seed, checkpoint_interval=self.output.checkpoint_interval,
            weight_grad=e.weight_grad, on_nonfinite=e.on_nonfinite, max_nonfinite_skips=e.max_nonfinite_skips,
        )

    # ---- flat views (config.json, --resume, --config) ---------------------------------------

    def groups(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in GROUP_FIELDS}

    def flat(self) -> dict[str, Any]:
        """Every field by its flag name (``task``, ``candidates``, ...), as given or filled in."""
        out: dict[str, Any] = {}
        for group in self.groups().values():
            for f in dataclasses.fields(group):
                out[f.name] = getattr(group, f.name)
        return out

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON values (what ``config.json`` holds under ``"args"``)."""
        return {k: jsonable(v) for k, v in self.flat().items() if k not in ("resume", "overwrite")}

    def comparable(self) -> dict[str, Any]:
        """The fields that define the run (what ``--resume`` must not change)."""
        return {k: v for k, v in self.to_json().items() if k not in NON_DEFINING}


def field_types() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    """Every configuration field by name: its group and its dataclass field."""
    out: dict[str, tuple[type, dataclasses.Field[Any]]] = {}
    for group in GROUPS:
        for f in dataclasses.fields(group):
            out[f.name] = (group, f)
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, str):
        return str(value)
    return value
