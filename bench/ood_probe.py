"""Does the upstream itself tell the keywords apart out of domain? A probe of the frozen upstream,
no training, no delta.

For each KS test set (the embedded espeak-ng test set, and the out-of-domain sets of
``bench/ood_ks.py``: festival and held-out espeak-ng voices), every clip's hidden states are
averaged over its frames, layer by layer, and two nearest-centroid classifiers (cosine, features
standardised on the fitting clips) read the twelve classes from them:

- ``within``: leave one speaker out inside the set itself (on festival, one *voice* out: its
  speakers are its voices at several speaking rates, too close to count as other speakers). It asks whether the upstream's
  representation separates the words *of that speech* at all, given examples of it: an upper bound
  for any head on these features.
- ``from-espeak``: centroids from the embedded espeak-ng test set, applied to the set. It is the
  nearest-centroid version of a head fitted on the training synthesiser and moved to new speech,
  what a KS delta's out-of-domain accuracy measures.

The same two figures on mean-pooled MFCCs (40 coefficients, no learning at all) are the control:
an upstream that knows speech should beat them, above all ``from-espeak``.

A ``within`` figure near chance on festival while espeak's is high says the upstream has not
learnt to represent that speech; a high ``within`` with a low ``from-espeak`` says it does, but
differently from espeak-ng's, so a head (or a delta) fitted on espeak-ng alone cannot carry over::

    python bench/ood_probe.py --upstream adtuning-hubert-small
    python bench/ood_probe.py --upstream adtuning-hubert-mini --sets festival

Results: ``bench/results/<date>-ood-probe-<upstream>.json`` (per set and layer, both figures; chance 1/12).
Figures of out-of-domain sets are for reporting, never for choosing a recipe.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ood_ks  # noqa: E402


def clips(test_dir: Path) -> tuple[list[Path], list[str], list[str]]:
    """The set's wav files, their class (folder: keyword, ``_unknown_`` or ``_silence_``) and speaker
    (the name's token before ``_nohash_``, after its last ``_``; a file without one is a speaker of its own)."""
    paths = sorted(p for p in Path(test_dir).rglob("*.wav"))
    if not paths:
        raise SystemExit(f"ood_probe: no wav files under {test_dir}")
    labels = [p.parent.name for p in paths]
    speakers = [p.stem.split("_nohash_")[0].rsplit("_", 1)[-1] if "_nohash_" in p.stem else p.stem for p in paths]
    return paths, labels, speakers


def features(upstream, paths: list[Path], batch: int = 16) -> np.ndarray:
    """``[N, layers, D]``: each clip's hidden states of every layer averaged over its valid frames."""
    import soundfile as sf
    import torch

    from adtuning.speech.data import collate

    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            padded = collate([{"wav": sf.read(str(p), dtype="float32")[0], "id": str(p)} for p in paths[i:i + batch]])
            hidden, frames = upstream(padded["wav"], padded["wav_lengths"])
            mask = (torch.arange(hidden[0].shape[1])[None] < frames[:, None]).float()[..., None]
            pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in hidden], 1)
            out.append(pooled.numpy())
    return np.concatenate(out)


def mfcc_features(paths: list[Path]) -> np.ndarray:
    """``[N, 1, 40]``: each clip's MFCCs (torchaudio, 40 coefficients) averaged over its frames, the control."""
    import soundfile as sf
    import torch
    import torchaudio

    mfcc = torchaudio.transforms.MFCC(sample_rate=16_000, n_mfcc=40)
    with torch.no_grad():
        return np.stack([mfcc(torch.from_numpy(sf.read(str(p), dtype="float32")[0])).mean(-1).numpy()[None] for p in paths])


def probe(data: dict, reference: str) -> dict:
    """Per set and layer, ``within`` and (sets other than ``reference``) ``from_espeak`` accuracies."""
    ref_x, ref_y, _ = data[reference]
    results = {}
    for kind, (x, labels, speakers) in data.items():
        per_layer = []
        for layer in range(x.shape[1]):
            entry = {"layer": layer, "within": leave_one_speaker_out(x[:, layer], labels, speakers)}
            if kind != reference:
                predicted = nearest_centroid(ref_x[:, layer], ref_y, x[:, layer])
                entry["from_espeak"] = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
            per_layer.append(entry)
        results[kind] = {"clips": len(labels), "speakers": len(set(speakers)), "layers": per_layer,
                         "best_within": max(e["within"] for e in per_layer),
                         "best_from_espeak": max((e["from_espeak"] for e in per_layer if "from_espeak" in e), default=None)}
    return results


def nearest_centroid(fit_x: np.ndarray, fit_y: list[str], x: np.ndarray) -> list[str]:
    """Labels of ``x`` by the nearest class mean of ``fit_x`` in cosine distance, after standardising
    with ``fit_x``'s mean and deviation."""
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    z_fit, z = (fit_x - mean) / std, (x - mean) / std
    classes = sorted(set(fit_y))
    centroids = np.stack([z_fit[[y == c for y in fit_y]].mean(0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
    z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
    return [classes[k] for k in (z @ centroids.T).argmax(1)]


def leave_one_speaker_out(x: np.ndarray, labels: list[str], speakers: list[str]) -> float:
    """Accuracy of :func:`nearest_centroid` fitted on every other speaker, for each speaker in turn."""
    correct = 0
    for s in sorted(set(speakers)):
        held = np.array([t == s for t in speakers])
        fit_y = [y for y, h in zip(labels, held) if not h]
        predicted = nearest_centroid(x[~held], fit_y, x[held])
        correct += sum(p == y for p, y in zip(predicted, [y for y, h in zip(labels, held) if h]))
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", default="adtuning-hubert-small", help="the frozen upstream to probe")
    parser.add_argument("--corpus-cache", type=Path, default=None, help="the embedded corpora (default: the CLI's)")
    ood_ks.add_set_arguments(parser)
    args = parser.parse_args(argv)
    from adtuning.embedded import DEFAULT_CORPUS_CACHE, embedded_corpus
    from adtuning.environment import environment
    from adtuning.speech import build_upstream
    from adtuning.speech.synth import speech_commands_test_root

    # leave-one-speaker-out needs two speakers
    sets, festival_voices = ood_ks.checked_sets(parser, args, min_speakers=2)
    root = embedded_corpus("ks").generate(args.corpus_cache or DEFAULT_CORPUS_CACHE, progress=False)
    dirs = {"espeak-in-domain": speech_commands_test_root(root)}
    for kind in sets:
        folder = ood_ks.set_folder(args.work, kind, args.speakers, festival_voices)
        dirs[kind] = speech_commands_test_root(ood_ks.write_test_set(kind, folder, args.speakers, festival_voices))
    upstream = build_upstream(args.upstream, progress=False).eval()
    data, control = {}, {}
    for kind, folder in dirs.items():
        paths, labels, speakers = clips(folder)
        if kind == "festival":  # speaker j is voice j mod V at some rate: hold out whole voices
            speakers = [f"voice{int(s[:2]) % len(festival_voices)}" for s in speakers]
        data[kind] = (features(upstream, paths), labels, speakers)
        control[kind] = (mfcc_features(paths), labels, speakers)
    results, controls = probe(data, "espeak-in-domain"), probe(control, "espeak-in-domain")
    for kind, r in results.items():
        c = controls[kind]
        print(f"ood_probe: {kind}: within {r['best_within']:.3f} (MFCC {c['best_within']:.3f})"
              + ("" if r["best_from_espeak"] is None else
                 f", from espeak-ng {r['best_from_espeak']:.3f} (MFCC {c['best_from_espeak']:.3f})")
              + f"; best of {len(r['layers'])} layers, {r['clips']} clips, chance 0.083")
    doc = {"environment": environment(), "upstream": args.upstream, "sets": results, "mfcc_control": controls, "speakers": args.speakers,
           "festival_voices": list(festival_voices), "chance": 1 / 12, "command": " ".join([sys.executable, *sys.argv])}
    ood_ks.write_result(args.results_dir, f"ood-probe-{Path(args.upstream).name}", doc, "ood_probe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
