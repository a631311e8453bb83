"""Out-of-domain keyword spotting: a KS delta trained on the espeak-ng corpus, tested on speech it never heard.

Two KS test sets in the Speech Commands test-set layout (the ten keywords, ``_unknown_`` filler
words, ``_silence_``), each clip a single word at 16 kHz, placed as the embedded training corpus
places its words (``adtuning.speech.synth.place_word``: a random offset in 1 s, a peak drawn from
0.25-0.8, a noise floor 28-42 dB below it), so that only the speech is new:

- ``festival``: Debian's festival synthesiser (``text2wave``), a synthesiser no training corpus
  uses; its voices (``--festival-voices``, by default two male diphone voices and one female HTS
  voice) at several speaking rates (``Duration_Stretch``), speaker ``j`` being voice ``j mod V``.
  Check scripts may need ``apt-get install festival festvox-kdlpc16k festvox-us-slt-hts``; the
  README's set-up never does.
- ``espeak-held-out``: espeak-ng voices and variants that no training corpus uses
  (:func:`adtuning.speech.speakers.held_out_speakers`).

Then ``adtuning.export.evaluate_delta`` gives the delta's test metrics on each, beside its own
in-domain test figure from ``summary.json``::

    python bench/ood_ks.py outputs/adtuning/delta                 # both sets
    python bench/ood_ks.py RUN/delta --sets festival --speakers 6

Results: ``bench/results/<date>-ood-ks-<base model>-<method>[-augment-<P>].json`` (environment, sets, per-set metrics).
Chance is 1/12.
Choose recipes on the espeak-only dev sets; report these figures only at the end, never select on them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
FILLERS = ("bed", "cat", "happy", "house", "tree", "bird")
SAMPLE_RATE = 16_000
#: Bumped when the written clips change (2: words placed as the training corpus places them, through
#: ``adtuning.speech.synth.place_word``, and festival's speaking rates applied); names the cached sets.
SET_FORMAT = 2
#: Debian's English festival voices: kal and ked (diphone, male; festvox-kallpc16k, festvox-kdlpc16k)
#: and slt (HTS, female; festvox-us-slt-hts).
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")


def _trim(x, threshold: float = 0.02):
    """Leading and trailing silence cut as ``trim_and_resample`` cuts espeak-ng's output for the
    training corpus (``adtuning.speech.synthesis.trim_silence``), at most 0.99 s."""
    import numpy as np

    from adtuning.speech.synthesis import trim_silence

    return trim_silence(np.asarray(x, dtype=np.float64), SAMPLE_RATE, threshold)[: SAMPLE_RATE - 160]


def festival_eval(voice: str, stretch: float) -> str:
    """The ``text2wave -eval`` expression selecting ``voice`` at speaking-rate ``stretch``.

    One expression: text2wave evaluates only the first of several written side by side, so
    ``(voice_x)(Parameter.set ...)`` would silently drop the stretch."""
    return f"(begin (voice_{voice}) (Parameter.set 'Duration_Stretch {stretch:g}))"


def _festival(word: str, voice: str, stretch: float) -> "object":
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    with tempfile.TemporaryDirectory() as tmp:
        text, wav = Path(tmp) / "w.txt", Path(tmp) / "w.wav"
        text.write_text(word)
        done = subprocess.run(["text2wave", "-eval", festival_eval(voice, stretch), str(text), "-o", str(wav)], check=True, capture_output=True,
                              text=True)
        if not wav.is_file():  # text2wave exits 0 for a voice it does not know, and writes nothing
            raise SystemExit(f"ood_ks: festival could not use voice {voice!r} (is its festvox package installed?): "
                             f"{done.stderr.strip() or done.stdout.strip()}")
        x, rate = sf.read(str(wav), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    return _trim(AF.resample(torch.from_numpy(x)[None], rate, SAMPLE_RATE)[0].numpy())


def _espeak_speakers(n: int):
    from adtuning.speech.espeak import EspeakSynthesizer
    from adtuning.speech.speakers import held_out_speakers
    from adtuning.speech.synthesis import trim_and_resample

    synth = EspeakSynthesizer()

    def say(word: str, speaker):
        voice, rate, pitch = speaker
        return trim_and_resample(synth.synthesize(word, voice, rate, pitch), SAMPLE_RATE - 160)

    return held_out_speakers(n), say


def festival_speakers(voices: tuple[str, ...], speakers: int) -> list[tuple[str, float]]:
    """``speakers`` (voice, Duration_Stretch) pairs: voice ``j mod V``, the stretches of each voice spread over 0.8-1.2."""
    out = []
    for j in range(speakers):
        v, i = j % len(voices), j // len(voices)
        of_voice = len(range(v, speakers, len(voices)))  # speakers of voice v
        out.append((voices[v], 0.8 + 0.4 * i / max(1, of_voice - 1)))
    return out


def write_test_set(kind: str, folder: Path, speakers: int,
                   festival_voices: tuple[str, ...] = FESTIVAL_VOICES) -> Path:
    """The KS corpus root (``speech_commands_v0.01``, empty) with its test set beside it."""
    import numpy as np
    import soundfile as sf

    from adtuning.atomic import replace_dir
    from adtuning.speech.synth import place_word, speech_commands_test_root
    from adtuning.speech.synthesis import rng

    root = folder / "speech_commands_v0.01"
    test = speech_commands_test_root(root)
    if test.is_dir():
        return root
    if kind == "festival":
        if shutil.which("text2wave") is None:
            raise SystemExit("ood_ks: festival's text2wave is not installed (apt-get install festival)")
        voices = festival_speakers(festival_voices, speakers)

        def say(word, speaker):
            return _festival(word, *speaker)
    else:
        voices, say = _espeak_speakers(speakers)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))  # one per writer
    try:
        (staging / root.name).mkdir()
        for j, speaker in enumerate(voices):
            for word in KEYWORDS + FILLERS:
                label = word if word in KEYWORDS else "_unknown_"
                path = staging / test.name / label / f"{word}_{j:02d}{kind[:4]}_nohash_0.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), place_word(say(word, speaker), rng("ood-ks", kind, j, word)), SAMPLE_RATE, subtype="PCM_16")
        noise = np.random.default_rng(0)
        for j in range(len(voices)):
            path = staging / test.name / "_silence_" / f"silence_{j:02d}{kind[:4]}_nohash_0.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), (0.01 * noise.standard_normal(SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
        raise
    replace_dir(staging, folder)  # a set another writer finished meanwhile is the same set; a stray folder goes
    return root


def set_folder(work: Path, kind: str, speakers: int, festival_voices: tuple[str, ...]) -> Path:
    """Where a set is written (and found again): named after its format, kind, speakers and voices."""
    return work / (f"v{SET_FORMAT}-{kind}-{speakers}" + ("-" + "-".join(festival_voices) if kind == "festival" else ""))


def add_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose and place the out-of-domain sets (shared with ``bench/ood_probe.py``)."""
    parser.add_argument("--sets", default="festival,espeak-held-out", help="comma-separated: festival, espeak-held-out")
    parser.add_argument("--speakers", type=int, default=12, help="speakers (voices x rates) per set")
    parser.add_argument("--festival-voices", default=",".join(FESTIVAL_VOICES),
                        help="comma-separated festival voices (speaker j is voice j mod V)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adtuning-ood-ks",
                        help="where the sets are written and kept")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")


def checked_sets(parser: argparse.ArgumentParser, args: argparse.Namespace, min_speakers: int) -> tuple[list[str], tuple[str, ...]]:
    """``(sets, festival voices)`` from :func:`add_set_arguments`' flags; a bad value exits naming its flag."""
    sets = [s for s in args.sets.split(",") if s]
    bad = [s for s in sets if s not in ("festival", "espeak-held-out")]
    if bad or not sets:
        parser.error(f"--sets: unknown {', '.join(bad)}" if bad else "--sets: give at least one set")
    festival_voices = tuple(v for v in args.festival_voices.split(",") if v)
    if not festival_voices:
        parser.error("--festival-voices: give at least one voice")
    if args.speakers < min_speakers:
        parser.error(f"--speakers: must be at least {min_speakers}, got {args.speakers}")
    return sets, festival_voices


def write_result(results_dir: Path, name: str, doc: dict, who: str) -> Path:
    """Write ``doc`` as ``results_dir/<UTC date>-<name>.json`` and say so."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}-{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(f"{who}: wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("delta_dir", type=Path, help="a KS delta (RUN/delta) written by python -m adtuning.train")
    add_set_arguments(parser)
    args = parser.parse_args(argv)
    from adtuning.environment import environment
    from adtuning.export import evaluate_delta
    from adtuning.speech.synth import speech_commands_test_root

    sets, festival_voices = checked_sets(parser, args, min_speakers=1)
    run_summary = args.delta_dir.parent / "summary.json"
    summary = json.loads(run_summary.read_text()) if run_summary.is_file() else {}
    in_domain = summary.get("final", {}).get("test")
    meta = json.loads((args.delta_dir / "delta.json").read_text())
    run_config = args.delta_dir.parent / "config.json"  # the run's flags, when the delta sits in its run folder
    flags = json.loads(run_config.read_text())["args"] if run_config.is_file() else {}
    augment = flags.get("augment", 0.0)
    results = {}
    for kind in sets:
        root = write_test_set(kind, set_folder(args.work, kind, args.speakers, festival_voices), args.speakers, festival_voices)
        metrics = evaluate_delta(args.delta_dir, root, "test", progress=False)
        results[kind] = {"metrics": metrics, "clips": sum(1 for _ in speech_commands_test_root(root).rglob("*.wav"))}
        print(f"ood_ks: {kind}: accuracy {metrics['accuracy']:.4f} on {results[kind]['clips']} clips (chance 0.0833)")
    doc = {"environment": environment(), "delta": str(args.delta_dir), "base_model": meta["base_model"], "method": meta.get("method"),
           "augment": augment, "in_domain_test": in_domain,
           # how the delta was made: its run's flags and the commits its segments ran at
           "run": {"flags": flags, "commits": summary.get("commits")}, "sets": results, "speakers": args.speakers,
           "festival_voices": list(festival_voices), "chance": 1 / 12}
    print(f"ood_ks: in-domain test {in_domain}")
    name = f"ood-ks-{Path(str(meta['base_model'])).name}-{meta.get('method') or 'ad-tuning'}" + (f"-augment-{augment:g}" if augment else "")
    write_result(args.results_dir, name, doc, "ood_ks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
