"""The registry of embedded corpora: the tasks that run without ``--data-dir``.

For each such task the CLI generates (once, cached under ``--corpus-cache``) a small corpus with
the project's espeak-ng synthesiser, in the on-disk layout of the real corpus, so the ordinary
readers of :mod:`adtuning.speech.corpora` read it unchanged. Each entry says what the corpus is,
where it lives in the cache, which generator writes it with which parameters, and the run
defaults (steps, learning rate, batch size, dev-evaluation fraction) that suit it.

This module is a leaf (no torch, no transformers) so that ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunDefaults:
    """Defaults for --steps / --lr / --batch-size and the dev evaluation every steps/eval_fraction."""

    steps: int
    lr: float
    batch_size: int
    eval_fraction: int

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "eval_fraction": self.eval_fraction}


DEFAULT_CORPUS_CACHE = Path(os.environ.get("ADTUNING_CACHE", Path.home() / ".cache" / "adtuning")) / "corpora"
"""Where generated corpora are cached (``--corpus-cache``; ``$ADTUNING_CACHE/corpora``)."""

# A 1M-parameter pre-trained upstream, a few thousand short clips and two CPU cores need a larger
# learning rate and batch than a base model on a real corpus (CORPUS_RUN_DEFAULTS).
EMBEDDED_RUN_DEFAULTS = RunDefaults(steps=300, lr=5e-3, batch_size=32, eval_fraction=5)
CORPUS_RUN_DEFAULTS = RunDefaults(steps=150, lr=1e-3, batch_size=16, eval_fraction=10)


@dataclass(frozen=True)
class EmbeddedCorpus:
    """One task's embedded corpus.

    ``folder`` is the corpus root relative to the cache (what ``--data-dir`` would point at);
    ``generator`` is ``"module:function"``, called as ``function(root, progress=..., **params)``
    and returning the root it wrote (or found valid in the cache). ``task_options`` are the
    defaults of ``--task-option`` for this corpus (reader and head options; an explicit
    ``--task-option`` wins); ``"{root}"`` in a string value stands for the corpus root
    (:meth:`resolved_task_options`).
    """

    task: str
    what: str
    folder: str
    generator: str
    params: dict[str, Any]
    run_defaults: RunDefaults = EMBEDDED_RUN_DEFAULTS
    task_options: dict[str, Any] = field(default_factory=dict)
    notes: str = field(default="", compare=False)

    def generate(self, cache: Path, *, progress: bool = True, **overrides: Any) -> Path:
        """Generate (or reuse from ``cache``) this corpus and return its root."""
        module, _, name = self.generator.partition(":")
        fn = getattr(importlib.import_module(module), name)
        return fn(Path(cache) / self.folder, progress=progress, **{**self.params, **overrides})

    def resolved_task_options(self, root: str | os.PathLike) -> dict[str, Any]:
        """:attr:`task_options` with ``"{root}"`` in string values replaced by ``root``."""
        return {k: v.replace("{root}", str(root)) if isinstance(v, str) else v for k, v in self.task_options.items()}


EMBEDDED_CORPORA: dict[str, EmbeddedCorpus] = {}


def register(corpus: EmbeddedCorpus) -> EmbeddedCorpus:
    """Add ``corpus`` to the registry (one entry per task)."""
    if corpus.task in EMBEDDED_CORPORA:
        raise ValueError(f"task {corpus.task!r} already has an embedded corpus")
    EMBEDDED_CORPORA[corpus.task] = corpus
    return corpus


def embedded_corpus(task: str) -> EmbeddedCorpus:
    """The registered embedded corpus of ``task``; a clear KeyError naming the known tasks otherwise."""
    try:
        return EMBEDDED_CORPORA[task]
    except KeyError:
        raise KeyError(f"task {task!r} has no embedded corpus (known: {', '.join(EMBEDDED_CORPORA)})") from None


register(EmbeddedCorpus(
    task="ks", what="keyword-spotting", folder="speech_commands_synth/speech_commands_v0.01",
    generator="adtuning.speech.synth:generate_speech_commands",
    params=dict(speakers=48, utterances_per_word=192, held_out_speakers=1 / 6, seed=0),
    notes="48 downstream speakers (32 train, 8 dev, 8 test; disjoint from each other and from the "
          "upstream's pre-training speakers), 4 clips of each of the 10 keywords and 6 filler words per "
          "speaker: 2,051 train, 515 dev and 384 test clips."))
register(EmbeddedCorpus(
    task="sid", what="speaker-identification", folder="voxceleb1_synth/VoxCeleb1",
    generator="adtuning.speech.synth_tasks:generate_voxceleb1",
    params=dict(speakers=32, videos_per_speaker=8, utterances_per_video=4, dev_videos=1, test_videos=1, words=(3, 6),
                max_seconds=3.5, min_pitch_gap=12, min_rate_gap=30, seed=1),
    # More sessions per speaker (channels to generalise over), speakers of one voice further apart, and
    # more, smaller steps: test accuracy 0.477 instead of 0.297 (5 sessions, gaps 6/20, T=300 x 32).
    run_defaults=RunDefaults(steps=500, lr=5e-3, batch_size=16, eval_fraction=5),
    notes="VoxCeleb1 layout: 32 speakers, 8 sessions of 4 phrases of 3-6 words each; per speaker 6 sessions "
          "train, 1 dev, 1 test: 768 train, 128 dev, 128 test utterances."))
register(EmbeddedCorpus(
    task="ic", what="intent-classification", folder="fluent_speech_commands_synth/fluent_speech_commands_dataset",
    generator="adtuning.speech.synth_tasks:generate_fluent_commands",
    params=dict(speakers=40, held_out_speakers=0.15, seed=2),
    notes="Fluent Speech Commands layout: 40 speakers (28 train, 6 valid, 6 test), each saying the "
          "31 intents once: 868 train, 186 valid, 186 test utterances."))
# One corpus for ASR and PR (PR adds the lexicon the generator writes next to the subsets).
_LIBRISPEECH = dict(speakers=32, held_out_speakers=0.125, chapters_per_speaker=2, utterances_per_chapter=24,
                    words=(2, 5), vocabulary_size=100, seed=6)
register(EmbeddedCorpus(
    task="asr", what="speech-recognition", folder="librispeech_synth/LibriSpeech",
    generator="adtuning.speech.synth_asr:generate_librispeech",
    params=_LIBRISPEECH,
    run_defaults=RunDefaults(steps=1200, lr=1e-2, batch_size=16, eval_fraction=5),
    # A linear CTC head (the recipe's is 2 x 1024 BiLSTM) and no SpecAugment, which in a few hundred
    # steps only slows CTC down (dev CER 0.58 vs 0.89 after 100 steps). One BiLSTM of 256 at T=600
    # reached the same (dev WER 0.842 / CER 0.267, test 0.947 / 0.409) at 3x the time per step.
    task_options=dict(project_dim=256, rnn_layers=0, specaug=False),
    notes="LibriSpeech layout: 32 American-English speakers (24 train-clean-100, 4 dev-clean, 4 test-clean), "
          "2 chapters of 24 sentences of 2-5 words from 100 words each: 1,152 / 192 / 192 utterances."))
register(EmbeddedCorpus(
    task="pr", what="phoneme-recognition", folder="librispeech_synth/LibriSpeech",
    generator="adtuning.speech.synth_asr:generate_librispeech",
    params=_LIBRISPEECH,
    run_defaults=RunDefaults(steps=400, lr=1e-2, batch_size=16, eval_fraction=5),
    task_options=dict(lexicon="{root}/librispeech-lexicon.txt"),
    notes="The ASR corpus (same folder) and its lexicon, espeak-ng's own phonemisation mapped to CMU phones."))
register(EmbeddedCorpus(
    task="sf", what="slot-filling", folder="snips_synth/SNIPS",
    generator="adtuning.speech.synth_snips:generate_snips",
    params=dict(train_sentences=800, valid_sentences=120, test_sentences=120, seed=4),
    # A linear CTC head (as ASR's and PR's) and no SpecAugment: its steps cost a fifth of the BiLSTM's,
    # so T=1200 fits a few minutes; test slot-type F1 0.357 (BiLSTM 256, T=400: 0.081; always
    # predicting the most frequent slot type: 0.181).
    run_defaults=RunDefaults(steps=1200, lr=1e-2, batch_size=16, eval_fraction=5),
    task_options=dict(project_dim=256, rnn_layers=0, specaug=False),
    notes="Audio SNIPS layout: the recipe's 16 speaker names (8 train, 4 valid, 4 test), 7 intents x 4 short "
          "templates with 20 slot types: 800 / 120 / 120 utterances."))
register(EmbeddedCorpus(
    task="sd", what="speaker-diarization", folder="librimix_synth/data",
    generator="adtuning.speech.synth_librimix:generate_librimix",
    params=dict(speakers=24, held_out_speakers=1 / 6, train_mixtures=400, dev_mixtures=64, test_mixtures=64, seed=5),
    run_defaults=RunDefaults(steps=300, lr=5e-3, batch_size=16, eval_fraction=5),
    task_options=dict(hidden_size=128),
    notes="LibriMix / Kaldi layout: 24 speakers (16 train, 4 dev, 4 test), two-speaker recordings of 2-4 "
          "alternating turns, each turn change overlapping with probability 1/2: 400 / 64 / 64 recordings "
          "(best constant prediction: test DER 0.646)."))
