"""The recipe: setup -> fisher -> search -> compare -> evaluate -> save, driven by a :class:`RunConfig`.

1. **setup** — read the corpus, build the upstream and the task head, fingerprint the base.
2. **fisher** — one per-sample Fisher pass over training samples (``--fisher-mode`` preset applied,
   or the children of an interrupted run loaded); nested child networks for every candidate P.
3. **search** — train every candidate for r*T steps on the one model copy, evaluate on dev,
   continue the best c to T (:mod:`adtuning.search`). A method other than AD-TUNING is a search
   of one candidate: its child (CHILD-TUNING), every entry (FT) or none (head-only methods and
   the module-adding methods, whose modules train with the head).
4. **compare** — ``--measure-regret`` and ``--baselines``, under the same schedule, seed and data order.
5. **evaluate** — dev (and test when present) metrics of the chosen candidate.
6. **save** — the delta, ``summary.json`` and the plots (:mod:`adtuning.recipe.summary`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from adtuning import rng
from adtuning.atomic import atomic_write, remove_stale_temporaries
from adtuning.backends import BackendUnavailableError, get_backend, resolve_backend_name
from adtuning.checkpoint import weights_fingerprint
from adtuning.child import ChildNetwork
from adtuning.distributed import DataParallel
from adtuning.embedded import embedded_corpus
from adtuning.environment import source_commit
from adtuning.recipe.config import RunConfig, UsageError
from adtuning.recipe.methods import METHODS, canonical_method, prepare_task
from adtuning.recipe.problem import LoaderSettings, SpeechProblem
from adtuning.search import AdaptiveSearch
from adtuning.speech.registry import split_task_options

log = logging.getLogger("adtuning")

#: ``--fisher-groups auto`` lets the Fisher phase exceed the training phase's memory by this fraction
#: of the weight bytes (fewer passes over the Fisher samples).
AUTO_GROUPS_HEADROOM = 0.2


def choose_threads(requested: int | None) -> tuple[int, str]:
    """The torch CPU thread count of a run and why: ``--threads`` when given, else torch's
    default (one per core); on a machine busy with other jobs one thread can win, which is what
    ``--threads 1`` is for."""
    if requested is not None:
        return requested, "--threads"
    return torch.get_num_threads(), "torch default: one per core; --threads to change"


def choose_backend(requested: str | None, device: torch.device) -> tuple[str, str]:
    """The kernel backend and why: the one asked for (``fused``, ``native``, ...), else the fused
    one of the device when it loads (the reference backend is for tests and for checking), else
    the reference. A backend asked for that cannot load is a :class:`UsageError`."""
    if requested:
        flag = "--fused" if requested == "fused" else "--backend"
        name = resolve_backend_name(requested, device)
        try:
            get_backend(name, device)
        except BackendUnavailableError as err:
            raise UsageError(f"{flag}: backend {name!r} is not available: {err}") from err
        return name, f"asked for with {flag}"
    try:
        name = resolve_backend_name("fused", device)
        get_backend(name, device)
    except BackendUnavailableError as err:
        log.warning("the fused backend is not available (%s); using the reference backend (pure PyTorch, slower)", err)
        return "reference", "the fused backend is not available"
    return name, "the fused backend of this device, the default; --backend reference for the pure-PyTorch path"


def optional_split(build_dataset, task, data_dir, options):
    """The test split, or ``None`` when the corpus has none (its folder or list is absent or
    lists nothing). A test split that is there but broken is an error, never taken for absence."""
    from adtuning.speech import MissingDataError

    try:
        return build_dataset(task, data_dir, "test", **options)
    except MissingDataError as err:
        log.info("no test split (%s)", err)
        return None


def child_paths(folder: Path, ps) -> list[Path]:
    # No dot in the stem: ChildNetwork.save takes "p0.01" for stem "p0" and suffix ".01".
    return [folder / (f"p{p:g}".replace(".", "_") + ".safetensors") for p in ps]


class Recipe:
    """One run of the recipe on one configuration (see the module docstring)."""

    def __init__(self, config: RunConfig, dp: DataParallel | None = None):
        self.config = config
        self.dp = dp
        self.is_main = dp is None or dp.is_main
        self.world_size = 1 if dp is None else dp.world_size
        self.out: Path = Path(config.output.output_dir)
        self.method = canonical_method(config.method.method) or "ad-tuning"
        self.started = time.time()
        self.summary: dict[str, Any] = {}
        self.regret: dict[str, Any] | None = None
        self.baselines: dict[str, dict] | None = None
        self.writer = None
        self.resuming = config.output.resume
        self.attached: Any = None  # the modules a module-adding method attached to the upstream (AttachedMethod)
        self.fisher_info: dict[str, Any] = {}

    @property
    def progress(self) -> bool:
        return not self.config.output.no_progress and self.is_main

    # 1. setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, dp = self.config, self.dp
        if dp is None:
            self._prepare_output_dir()
            self.device = torch.device(cfg.engine.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        else:
            # Rank 0 owns the run folder; a refusal there is raised on every rank.
            self.resuming = dp.run_on_main(self._prepare_output_dir)
            self.device = dp.device
            log.info("%s", dp.describe())
        from adtuning.phase_memory import PhaseMemory

        self.phases = PhaseMemory(self.device)
        self.backend, why = choose_backend(cfg.engine.requested_backend, self.device)
        log.info("backend: %s (device %s; %s)", self.backend, self.device, why)
        threads, why = choose_threads(cfg.engine.threads)
        torch.set_num_threads(threads)
        log.info("torch threads: %d (%s)", threads, why)

        from adtuning.speech import SpeechModel, build_dataset, build_upstream

        data, task_name = cfg.data, cfg.data.task
        data_dir = data.data_dir
        self.task_options = data.task_options()
        if data_dir is None:
            data_dir = self._embedded_corpus() if dp is None else dp.staged(self._embedded_corpus)
            # The embedded corpus's reader/head options (e.g. PR's lexicon, ASR's head size) under
            # the ones given with --task-option; the delta records the result, so export rebuilds
            # the same head.
            self.task_options = {**embedded_corpus(task_name).resolved_task_options(data_dir), **self.task_options}
            log.info("task options: %s", ", ".join(f"{k}={v!r}" for k, v in self.task_options.items()) or "none")
        dataset_options, self.head_options = split_task_options(task_name, self.task_options)
        self.train_set = build_dataset(task_name, data_dir, "train", **dataset_options)
        if data.augment > 0:
            from adtuning.speech.augmented import augmented_training_set

            self.train_set = augmented_training_set(self.train_set, data.augment, cfg.engine.seed,
                                                    Path(data.corpus_cache) / "downstream-rooms")
            log.info("augment: training clips degraded on the fly at probability scale %g", data.augment)
        self.dev_set = build_dataset(task_name, data_dir, "dev", **dataset_options)
        self.test_set = optional_split(build_dataset, task_name, data_dir, dataset_options)
        log.info("data: %s train / %s dev / %s test utterances from %s", len(self.train_set), len(self.dev_set),
                 len(self.test_set) if self.test_set is not None else "no", data_dir)

        up = cfg.upstream
        dtype = torch.bfloat16 if up.bf16 else torch.float32
        with self.phases.phase("load"):
            self.upstream = build_upstream(up.upstream, dtype=dtype, gradient_checkpointing=up.gradient_checkpointing,
                                           seed=cfg.engine.seed, progress=self.progress)
            self.base_fingerprint = weights_fingerprint(dict(self.upstream.named_parameters()))
            self.upstream_entries = sum(p.numel() for p in self.upstream.parameters())
            self.scored_names = list(self.upstream.default_scored_parameters())
            task = self._build_task(self.method)
            extra = self._attach(self.method)
            self.model = SpeechModel(self.upstream, task).to(self.device)
        if dp is not None:
            # Every rank built the same base model and head from the seed; make sure before training.
            dp.check_replicas({f"head {n}": p for n, p in task.named_parameters()}, "the initial heads")
            fingerprints = dp.all_gather_object(self.base_fingerprint)
            if len(set(fingerprints)) != 1:
                raise RuntimeError(f"data parallel: the ranks loaded different upstreams (fingerprints {fingerprints})")
        self.problem = self._problem(self.model, extra)
        self.data_dir = data_dir
        self._write_config()
        self._open_tensorboard()

    def _build_task(self, method: str):
        """The task head (and featurizer) of ``method``, initialised from the seed, so that every
        method's row starts from the same head."""
        from adtuning.speech import build_task

        upstream = self.upstream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.engine.seed)
            try:
                task = build_task(self.config.data.task, upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers,
                                  **{**getattr(self.train_set, "task_kwargs", {}), **self.head_options})
            except TypeError as err:  # an option neither the reader nor the head takes
                unknown = sorted(self.head_options)
                raise UsageError(f"--task-option: task {self.config.data.task!r} cannot take {', '.join(unknown) or 'its options'} "
                                 f"(neither its reader nor its head has such an option: {err})") from None
        prepare_task(method, task)
        return task

    def _attach(self, method: str) -> dict[str, torch.nn.Parameter]:
        """Attach a module-adding method's modules to the upstream (``self.attached``); returns
        their parameters, named ``method.<name>`` (they train with the head). Other methods add
        nothing."""
        if METHODS[method].kind != "module":
            return {}
        from adtuning.methods import MethodAttachError, attach

        try:
            # The added modules' initial values come from the seed alone (LoRA's A is random), so a
            # method's row is the same whatever ran before it in the process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.engine.seed)
                self.attached = attach(method, self.upstream, self.config.method_options(method))
        except MethodAttachError as err:
            raise UsageError(f"--method {method}: {err}") from None
        return {f"method.{n}": p for n, p in self.attached.parameters().items()}

    def _problem(self, model, extra: dict[str, torch.nn.Parameter] | None = None) -> SpeechProblem:
        cfg = self.config
        loaders = LoaderSettings(
            batch_size=cfg.optim.batch_size, eval_batch_size=cfg.optim.eval_batch_size, fisher_batch_size=cfg.fisher.fisher_batch_size,
            fisher_samples=cfg.fisher.fisher_samples, seed=cfg.engine.seed, max_train_hours=cfg.data.max_train_hours,
            num_workers=cfg.data.num_workers, progress=not cfg.output.no_progress,
        )
        base = self.attached.base_named_parameters() if self.attached is not None else None
        return SpeechProblem(model, self.train_set, self.dev_set, self.test_set, loaders, self.dp, extra_trainable=extra,
                             upstream_params=base)

    def _prepare_output_dir(self) -> bool:
        """Check the run folder against the flags; returns whether a run is resumed (``--resume``
        on a folder in which nothing was saved yet starts the run, and says so)."""
        cfg, out = self.config, self.out
        resume, overwrite = cfg.output.resume, cfg.output.overwrite
        has_run = (out / "config.json").is_file()
        if has_run and not (resume or overwrite):
            raise UsageError(f"--output-dir: {out} already holds a run; pass --resume to continue it or --overwrite to start afresh")
        if resume and not has_run:
            leftovers = [sub for sub in ("checkpoint", "children", "delta", "summary.json") if (out / sub).exists()]
            if leftovers:
                raise UsageError(f"--resume: {out} holds {', '.join(leftovers)} but no config.json: not a run this command can "
                                 "continue; --overwrite to start afresh there")
            log.info("--resume: nothing was saved in %s yet; starting the run from the beginning", out)
            resume = False
        if resume:
            self._check_resumable(out)
        if overwrite and out.exists():
            for sub in ("checkpoint", "children", "delta", "baselines"):
                for f in (out / sub).rglob("*") if (out / sub).is_dir() else ():
                    if f.is_file():
                        f.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.resuming = resume
        return resume

    def _check_resumable(self, out: Path) -> None:
        config = json.loads((out / "config.json").read_text())
        saved_world = int(config.get("world_size", 1))
        if saved_world != self.world_size:
            raise UsageError(f"--resume: {out} was run by {saved_world} process(es) and this job has {self.world_size}; "
                             f"resume with the same world size (torchrun --nnodes x --nproc_per_node = {saved_world}), since "
                             "each process's data shard and random stream depend on it")
        saved = config["args"]
        current = self.config.comparable()
        # A flag added after the run was started counts as given at its default.
        defaults = RunConfig().comparable()
        saved = {k: saved.get(k, defaults.get(k)) for k in current}
        changed = {k: (saved[k], v) for k, v in current.items() if saved[k] != v}
        if changed:
            raise UsageError("--resume: these flags differ from the interrupted run: "
                             + ", ".join(f"{k} (was {a!r}, now {b!r})" for k, (a, b) in changed.items()))

    def _record_segment(self, resumed: bool) -> None:
        """Append this segment (the commit it runs at, resumed or not) to ``segments.json``."""
        path = self.out / "segments.json"
        segments = json.loads(path.read_text()) if resumed and path.is_file() else []
        segments.append({**source_commit(), "resumed": resumed, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(segments, indent=2)))
        self.segments = segments

    def _embedded_corpus(self) -> Path:
        corpus = embedded_corpus(self.config.data.task)
        log.info("embedded default: %s corpus synthesised with espeak-ng (cached in %s)",
                 corpus.what, (Path(self.config.data.corpus_cache) / corpus.folder).parent)
        return corpus.generate(self.config.data.corpus_cache, progress=not self.config.output.no_progress)

    def _write_config(self) -> None:
        config = {"args": self.config.to_json(), "base_model": self.config.upstream.upstream, "base_fingerprint": self.base_fingerprint,
                  "data_dir": str(self.data_dir), "backend": self.backend, "device": str(self.device),
                  "world_size": self.world_size}
        if not self.is_main:
            return
        # Temporaries of the run folder's own files left by a run that was killed while writing one
        # (the delta and the checkpoints clean theirs when they write).
        for name in ("config.json", "segments.json", "summary.json"):
            remove_stale_temporaries(self.out / name)
        if not self.resuming:
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        self._record_segment(self.resuming)

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
        """The children of the run: preset (methods whose child needs no scores: every entry, or
        none), loaded (resume), or drawn / scored by the Fisher pass and saved under ``children/``."""
        children_dir = self.out / "children"
        if self._preset_children():
            return
        paths = child_paths(children_dir, self.config.method.candidates)
        if self._resume_children(children_dir, paths):
            return
        start = time.perf_counter()
        if self.config.method.child_method == "bernoulli":
            settings = self.config.fisher_settings()
            upstream_params = self.problem.upstream_params
            scored = {n: upstream_params[n] for n in self._scored_names()}
            self.children = [ChildNetwork.bernoulli(scored, p, seed=self.config.engine.seed) for p in self.config.method.candidates]
            self.fisher_info = {"method": "bernoulli", "scored": settings.scored}
        else:
            self._score_children(start)
        if self.dp is not None:
            # Every rank trains rank 0's index sets: identical children by construction.
            self.children = self.dp.broadcast_children(self.children)
        if not self.is_main:
            return
        for child, path in zip(self.children, paths):
            child.save(path)
        atomic_write(children_dir / "fisher.json", lambda tmp: Path(tmp).write_text(json.dumps(self.fisher_info)))
        for child in self.children:
            log.info("P=%g  trainable params: %s || all upstream params: %s || trainable%%: %.4f  (threshold %s)",
                     child.p, f"{child.k:,}", f"{self.upstream_entries:,}", 100.0 * child.k / self.upstream_entries,
                     "n/a" if child.threshold is None else f"{child.threshold:.3e}")

    def _scored_names(self) -> list[str]:
        from adtuning.fisher import choose_scored_names

        try:
            return choose_scored_names(self.config.fisher_settings().scored, self.problem.upstream_params, self.scored_names)
        except ValueError as err:
            raise UsageError(f"--scored: {err}") from None

    def _resume_children(self, children_dir: Path, paths: list[Path]) -> bool:
        upstream_params = self.problem.upstream_params

        def load_saved():
            if not (self.resuming and all(p.is_file() for p in paths) and (children_dir / "fisher.json").is_file()):
                return None
            return [ChildNetwork.load(p, upstream_params) for p in paths], json.loads((children_dir / "fisher.json").read_text())

        saved = load_saved() if self.dp is None else self.dp.run_on_main(load_saved)
        if saved is None:
            return False
        self.children, self.fisher_info = saved
        if self.dp is not None:
            self.children = self.dp.broadcast_children(self.children)
        log.info("resume: loaded %d child networks from %s", len(self.children), children_dir)
        return True

    def _preset_children(self) -> bool:
        """The child of a method that trains every scored upstream entry (FT) or none (the head-only
        and module-adding methods): built from the shapes, the same on every rank and after a
        resume. Returns False for the methods whose children are drawn or scored."""
        from adtuning.search_candidate import baseline_child

        kind = METHODS[self.method].kind
        if kind in ("child", "search"):
            return False
        upstream_params = self.problem.upstream_params
        names = self._scored_names() if kind == "dense" else self.scored_names
        shapes = {n: tuple(upstream_params[n].shape) for n in names}
        self.children = [baseline_child("full" if kind == "dense" else "head-only", shapes)]
        self.fisher_info = {"method": "preset", "kind": kind, "scored": self.config.fisher_settings().scored}
        log.info("%s: %s upstream entries train, no Fisher pass", self.method, f"{self.children[0].k:,}")
        return True

    def _score_children(self, start: float) -> None:
        cfg, dp = self.config, self.dp
        settings = cfg.fisher_settings()
        scored_names = self._scored_names()
        grad_accum = cfg.optim.grad_accum
        if settings.mode == "per-sample":
            def objective(model, batch, fisher_pass):
                # The model adapter reports frame lengths to the pass (padding skipped in backward).
                return None if batch is None else model.per_sample_nll(batch, fisher_pass.note_sample_lengths)

            make_batches = self.problem.fisher_batches
            max_samples = cfg.fisher.fisher_samples if dp is None else None
        else:
            def objective(model, batch, fisher_pass):
                # The recipe's training loss of a micro-batch (this rank's share under data parallel:
                # problem.loss joins the SD normaliser's all-reduce even for an empty part).
                loss = self.problem.loss(batch)
                return None if loss is None else loss / grad_accum

            def make_batches():
                batches = self.problem.fisher_batches()
                if dp is not None:  # under data parallel the sharded loader already holds --fisher-samples
                    return batches
                return _whole_batches(batches, cfg.fisher.fisher_samples)

            max_samples = None
        # Data parallel: each rank scores its part of the --fisher-samples; the sums are
        # all-reduced inside, so every rank has the scores of all of them. The scores of one
        # group of tensors at a time (--fisher-groups) are folded into the selection and freed.
        from adtuning.fisher_groups import auto_fisher_groups, fisher_children

        params = self.problem.upstream_params
        groups = settings.groups
        if groups is None:
            weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
            # Headroom of a fifth of the weights: at P_max = 0.01 on the XLS-R shapes the Fisher phase
            # then takes about 9 passes instead of 64 for a peak within 0.2x the weights of training's.
            groups = auto_fisher_groups({n: params[n].numel() for n in scored_names}, cfg.method.candidates,
                                        weight_bytes=weight_bytes, weight_element_size=params[scored_names[0]].element_size(),
                                        count_rule=settings.count_rule, headroom_bytes=int(AUTO_GROUPS_HEADROOM * weight_bytes))
            log.info("--fisher-groups auto: %d group(s)", groups)
        with self.phases.phase("fisher"):
            selection = fisher_children(
                self.model, make_batches, objective, cfg.method.candidates, groups=groups, count_rule=settings.count_rule,
                params=[f"upstream.{n}" for n in scored_names], rename=lambda name: name[len("upstream."):],
                mode=settings.mode, backend=self.backend, max_samples=max_samples, clip_norm=settings.clip_norm,
                train_mode=settings.train_mode, progress=self.progress, data_parallel=dp,
            )
        self.children = selection.children if self.is_main else None
        self.fisher_info = {"method": "fisher", "mode": cfg.fisher.fisher_mode, "scored": settings.scored,
                            "count_rule": settings.count_rule, "clip": settings.clip_norm, "groups": groups,
                            "group_entries": selection.group_entries, "selection_candidate_bytes": selection.candidate_bytes}
        if self.is_main:
            self.fisher_info.update(summary=selection.summary, histogram=selection.histogram, seconds=time.perf_counter() - start)

    # 3. search ------------------------------------------------------------------------------
    def search(self) -> None:
        cfg = self.config
        self.search_config = cfg.search_config(self.backend)
        # Weighted-sum (head-only) and FT train inside the search (its kinds: head-only, full),
        # by the name the run was given; the other baselines are method rows (compare).
        self._baseline_names = {("head-only" if canonical_method(b) == "weighted-sum" else "full"): b
                                for b in cfg.method.baselines if canonical_method(b) in ("weighted-sum", "full")}
        self.searcher = AdaptiveSearch(self.problem, self.children, self.search_config, checkpoint_dir=self.out / "checkpoint",
                                       progress=self.progress, on_event=self._event, baselines=tuple(self._baseline_names),
                                       data_parallel=self.dp, phases=self.phases)
        if self.resuming:
            self.searcher.load_checkpoint()
        with self.phases.phase("search"):  # each training segment is a "train" phase inside it
            self.best = self.searcher.run()
        log.info("chose P=%g after %d steps (exhaustive search: %d)", self.best.p, self.searcher.steps_spent(),
                 self.searcher.steps_exhaustive())

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
        with self.phases.phase("compare"):
            self._compare()

    def _compare(self) -> None:
        cfg = self.config
        self.regret = self.searcher.measure_regret() if cfg.method.measure_regret else None
        if self.regret is not None:
            r = self.regret
            log.info("regret %.4f (dev %s: best at T P=%g %.4f, chosen P=%g %.4f); %d extra steps", r["regret"], r["metric"],
                     r["best_p"], r["best_dev"], r["chosen_p"], r["chosen_dev"], r["steps_spent_regret"])
        self.baselines = None
        if self._baseline_names:
            report = self.searcher.run_baselines()
            self.baselines = {self._baseline_names[k]: v for k, v in report.items()}
        others = [b for b in cfg.method.baselines if canonical_method(b) not in ("weighted-sum", "full")]
        if others:
            from adtuning.recipe.rows import run_method_row

            self.baselines = dict(self.baselines or {})
            for name in others:
                self.baselines[name] = run_method_row(self, canonical_method(name))
            # The rows ran on the same upstream: the chosen candidate is swapped back in.
            self.searcher.apply(self.best)
        if self.baselines is not None:
            self.baselines = {b: self.baselines[b] for b in cfg.method.baselines}

    # 5. evaluate ----------------------------------------------------------------------------
    def evaluate(self) -> None:
        self.searcher.apply(self.best)
        with rng.kept(self.device), self.phases.phase("evaluate"):
            self.final = {"dev": self.problem.evaluate("dev")}
            if self.problem.has_split("test"):
                self.final["test"] = self.problem.evaluate("test")
        for split, metrics in self.final.items():
            log.info("final %s (P=%g): %s", split, self.best.p, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # 6. save --------------------------------------------------------------------------------
    def save(self) -> dict | None:
        """Rank 0 writes the delta, summary.json and the plots and returns the summary; other
        ranks write nothing and return ``None``."""
        from adtuning.recipe.summary import write_outputs

        if not self.is_main:
            if self.writer is not None:
                self.writer.close()
            return None
        self.summary = write_outputs(self)
        if self.writer is not None:
            self.writer.close()
        return self.summary


def _whole_batches(batches, budget: int):
    """A batch loss cannot be cut: whole batches up to the one reaching the budget."""
    seen = 0
    for batch in batches:
        if seen >= budget:
            return
        yield batch
        seen += len(batch["ids"])
