"""The shared toolkit of the generated corpora (keyword, pre-training, SID, IC, ASR/PR, SF, SD):
seeding, rendering espeak-ng output into 16 kHz clips, the manifest and folder rules, and the
one generation loop.

* :func:`rng` — a numpy Generator seeded by any printable parts (``rng("jitter", seed, i)``),
  so that every random choice of a corpus has its own stable stream.
* rendering — :func:`trim_silence`, :func:`trim_and_resample`, :func:`render_utterance`, :func:`jitter`,
  :func:`noise`, :func:`quantise`, :func:`write_wav`.
* folders — a corpus folder is complete when its manifest (:data:`MANIFEST_NAME`, written
  last, atomically through :mod:`adtuning.atomic`) holds the generator's cache key
  (:func:`read_manifest`, :func:`write_manifest`); folders are replaced only when a generator
  made them (:func:`is_ours_or_empty`, :func:`move_into_place`).
* :func:`run_plans` — the generation loop: one fresh espeak-ng process per plan (a speaker's
  fixed sequence of utterances, see :mod:`adtuning.speech.espeak`), results consumed in order;
  :func:`synthesise_corpus` wraps it with the cache, ownership and manifest rules for the
  single-folder corpora.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from adtuning.atomic import atomic_write_bytes
from adtuning.speech.espeak import ESPEAK_RATE_HZ, EspeakSynthesizer, Item, run_worker, synthesizer

__all__ = ["SAMPLE_RATE", "MANIFEST_NAME", "NOISE_KINDS", "OWNER_MARKER", "seed_ints", "rng", "trim_silence", "trim_and_resample",
           "render_utterance", "jitter", "quantise", "noise", "write_wav", "read_manifest", "write_manifest",
           "is_ours_or_empty", "move_into_place", "check_words", "run_plans", "synthesise_corpus"]

SAMPLE_RATE = 16000
"""Sample rate of every written file (espeak-ng itself runs at 22050 Hz)."""

MANIFEST_NAME = "adtuning_synth.json"
"""Manifest written last into a corpus folder; its presence with equal parameters is a cache hit."""

NOISE_KINDS = ("white", "pink", "brown")
"""The colours of :func:`noise`."""

OWNER_MARKER = ".adtuning_synth"
"""Marks folders a generator made (and may therefore replace)."""


def seed_ints(*parts: object) -> list[int]:
    """A stable seed (for numpy's SeedSequence) from any printable parts."""
    d = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return [int.from_bytes(d[i : i + 4], "little") for i in range(0, 16, 4)]


def rng(*parts: object):
    """``numpy.random.Generator`` seeded by ``parts`` (equal parts, equal stream)."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence(seed_ints(*parts)))


def trim_silence(x, rate: int, threshold: float = 0.02):
    """``x`` without its leading and trailing silence (what stays below ``threshold`` times the
    peak), 20 ms at ``rate`` kept around the speech (the last kept sample 20 ms less one after it)."""
    import numpy as np

    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max(initial=0.0)), 1e-9))
    if loud.size:
        pad = int(0.02 * rate)
        x = x[max(0, loud[0] - pad) : loud[-1] + pad]
    return x


def trim_and_resample(pcm: bytes, max_samples: int | None = None, threshold: float = 0.02):
    """espeak-ng int16 bytes at 22.05 kHz -> float64 numpy samples at 16 kHz with the leading
    and trailing silence trimmed (20 ms kept around the speech), at most ``max_samples``.

    Silence is what stays below ``threshold`` times the peak; transcribed corpora pass a lower
    one than the default so that a weak final consonant is never cut from its label."""
    import numpy as np
    import torch
    import torchaudio.functional as AF

    x = trim_silence(np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0, ESPEAK_RATE_HZ, threshold)
    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x))[None], ESPEAK_RATE_HZ, SAMPLE_RATE)
    return y[0].numpy().astype(np.float64)[:max_samples]


def render_utterance(pcm: bytes, rng, max_samples: int | None, snr_db: tuple[float, float],
                     noise_kind: str = "white", threshold: float = 0.02):
    """espeak-ng bytes -> int16 16 kHz utterance of the sentence-level corpora: silences trimmed
    (:func:`trim_and_resample` with ``threshold``), at most ``max_samples``, a random gain, and
    background noise of ``noise_kind`` at an SNR drawn from ``snr_db`` (relative to the peak)."""
    import numpy as np

    y = trim_and_resample(pcm, max_samples, threshold)
    peak = float(np.abs(y).max(initial=0.0))
    if peak == 0:
        raise RuntimeError("espeak-ng produced silence")
    y = y * (rng.uniform(0.25, 0.8) / peak)
    level = float(np.abs(y).max())
    y = y + noise(noise_kind, len(y), rng) * level * 10 ** (-rng.uniform(*snr_db) / 20)
    return quantise(y)


def jitter(seed_parts: tuple, rate: int, pitch: int, rate_scale: float, rate_jitter: float,
           pitch_jitter: int) -> tuple[int, int]:
    """A speaker's (rate, pitch) for one utterance: rate scaled by ``rate_scale`` and a uniform
    factor within +-``rate_jitter``, pitch moved by at most +-``pitch_jitter``; seeded by
    ``seed_parts``, clipped to espeak-ng's ranges."""
    import numpy as np

    r = rng("jitter", *seed_parts)
    return (int(np.clip(round(rate * rate_scale * r.uniform(1 - rate_jitter, 1 + rate_jitter)), 80, 450)),
            int(np.clip(pitch + int(r.integers(-pitch_jitter, pitch_jitter + 1)), 0, 100)))


def quantise(x):
    """float samples in [-1, 1] -> int16 (rounded, clipped)."""
    import numpy as np

    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def noise(kind: str, n: int, rng):
    """Unit-peak white, pink (1/f) or brown (1/f^2) noise of ``n`` samples."""
    import numpy as np

    w = rng.standard_normal(n)
    if kind != "white":
        spec = np.fft.rfft(w)
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = 1.0
        spec /= np.sqrt(f) if kind == "pink" else f
        spec[0] = 0.0
        w = np.fft.irfft(spec, n)
    return w / max(float(np.abs(w).max()), 1e-12)


def write_wav(path: Path, samples) -> None:
    """Write 16 kHz mono PCM-16 ``samples`` to ``path`` (parent folders created)."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def check_words(words: Sequence[str], what: str) -> list[str]:
    """``words`` as strings, each usable as a folder name; duplicates refused (ValueError naming ``what``)."""
    words = [str(w) for w in words]
    for w in words:
        if not w or w.startswith("_") or "/" in w or w != w.strip():
            raise ValueError(f"invalid {what} {w!r}")
    if len(set(words)) != len(words):
        raise ValueError(f"duplicate {what}s in {words}")
    return words


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a corpus folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, obj: dict) -> None:
    """Write ``obj`` as ``folder``'s manifest, atomically (indented by one, keys sorted)."""
    atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def is_ours_or_empty(folder: Path) -> bool:
    """Whether a generator may replace ``folder``: absent, empty, or marked by :data:`OWNER_MARKER`."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return (folder / OWNER_MARKER).exists() or not any(folder.iterdir())


def move_into_place(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing a previous ``dst``."""
    if dst.exists():
        shutil.rmtree(dst)
    try:
        os.replace(src, dst)
    except OSError:  # another filesystem
        shutil.move(str(src), str(dst))


def run_plans(plans: Sequence[Sequence[Item]], consume: Callable[[int, int, bytes], None], *, desc: str, unit: str,
              progress: bool, jobs: int | None, engine: EspeakSynthesizer | None = None) -> None:
    """The generation loop: synthesise each plan (one speaker's items) in a fresh espeak-ng
    process, at most ``jobs`` at once (default: CPU count, at most 4 and at most one per plan;
    the output does not depend on it), and call ``consume(plan, item, pcm)`` for every
    utterance, in plan then item order, in this thread. torch runs single-threaded meanwhile,
    so that resampling is bit-identical whatever the machine's thread count. ``engine`` names
    the espeak-ng library and data (default: espeakng-loader's)."""
    import torch
    from tqdm import tqdm

    engine = engine or synthesizer(None, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = tqdm(total=sum(map(len, plans)), desc=desc, unit=unit, disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs or os.cpu_count() or 1, 4, max(1, len(plans))))) as pool:
            futures = [pool.submit(run_worker, engine.library, engine.data, list(plan)) for plan in plans]
            for j, fut in enumerate(futures):
                for i, pcm in enumerate(fut.result()):
                    consume(j, i, pcm)
                    bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)


def synthesise_corpus(root: Path, key: dict, plans: list[list[Item]],
                      write: Callable[[Path, int, int, bytes], None], finish: Callable[[Path], int],
                      *, desc: str, progress: bool, jobs: int | None) -> Path:
    """A single-folder generated corpus (pre-training, SID, IC, ASR/PR, SF, SD): cache check
    (``key`` equal to the manifest's), ownership check, :func:`run_plans` with
    ``write(tmp, plan, item, pcm)`` per utterance, ``finish(tmp) -> utterances`` for the lists,
    then the folder is moved into place and the manifest written last. Returns ``root``."""
    manifest = read_manifest(root)
    if manifest is not None and {k: manifest.get(k) for k in key} == key:
        return root
    if not is_ours_or_empty(root):
        raise FileExistsError(f"{root} exists and was not made by {key['generator']}; remove it or choose another root")
    engine = synthesizer(None, None)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / OWNER_MARKER).touch()
    try:
        run_plans(plans, lambda j, i, pcm: write(tmp, j, i, pcm), desc=desc, unit="utt", progress=progress, jobs=jobs)
        utterances = finish(tmp)
        move_into_place(tmp, root)
        write_manifest(root, dict(key, espeak_version=engine.version, utterances=utterances))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
