"""Writers of tiny fixture corpora in the real on-disk layouts (sines and noise via soundfile)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def tone(freq: float, seconds: float, seed: int, amp: float = 0.4) -> np.ndarray:
    """A sine at ``freq`` Hz with a random phase and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def write(path: Path, wav: np.ndarray, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, sr, subtype="PCM_16")
    return path


# --- Speech Commands v0.01 + test set ------------------------------------------------------
KS_WORDS = {"yes": 300.0, "no": 600.0, "bed": 900.0}  # "bed" is an _unknown_ filler word


def write_speech_commands(base: Path) -> Path:
    root = base / "speech_commands_v0.01"
    val, test = [], []
    for w, (word, f) in enumerate(KS_WORDS.items()):
        for s in range(4):
            speaker = f"{w:02d}{s:02d}abcd"
            name = f"{speaker}_nohash_0.wav"
            write(root / word / name, tone(f + 20 * s, 1.0, seed=100 * w + s))
            (val if s == 2 else test if s == 3 else []).append(f"{word}/{name}")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    rng = np.random.default_rng(7)
    for k in range(2):
        write(root / "_background_noise_" / f"noise_{k}.wav", (0.05 * rng.standard_normal(3 * SR)).astype(np.float32))
    troot = base / "speech_commands_test_set_v0.01"
    for cls, f in (("yes", 310.0), ("no", 610.0), ("_unknown_", 910.0)):
        for s in range(2):
            write(troot / cls / f"t{s}_nohash_0.wav", tone(f, 1.0, seed=900 + s))
    write(troot / "_silence_" / "silence_0.wav", (0.01 * rng.standard_normal(SR)).astype(np.float32))
    return root


# --- Fluent Speech Commands ----------------------------------------------------------------
IC_ROWS = [("activate", "lights", "kitchen", 300.0), ("deactivate", "lights", "none", 500.0),
           ("increase", "volume", "none", 700.0), ("activate", "music", "bedroom", 900.0)]


def write_fluent(base: Path) -> Path:
    root = base / "fluent_speech_commands_dataset"
    (root / "data").mkdir(parents=True)
    for split, speakers in (("train", ("spkA", "spkB")), ("valid", ("spkC",)), ("test", ("spkD",))):
        with open(root / "data" / f"{split}_data.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["", "path", "speakerId", "transcription", "action", "object", "location"])
            n = 0
            for spk in speakers:
                for i, (a, o, loc, freq) in enumerate(IC_ROWS):
                    rel = f"wavs/speakers/{spk}/{split}_{i}.wav"
                    write(root / rel, tone(freq, 0.6 + 0.1 * i, seed=len(split) * 100 + ord(spk[-1]) * 10 + i))
                    wr.writerow([n, rel, spk, f"{a} {o} {loc}", a, o, loc])
                    n += 1
    return root


# --- VoxCeleb1 -----------------------------------------------------------------------------
def write_voxceleb(base: Path) -> Path:
    root = base / "VoxCeleb1"
    lines = []
    for s, spk in enumerate(("id10001", "id10002", "id10003")):
        for u in range(4):
            rel = f"{spk}/vid{u % 2}/{u:05d}.wav"
            write(root / "wav" / rel, tone(250.0 + 250 * s, 0.7 + 0.1 * u, seed=10 * s + u))
            lines.append(f"{1 if u < 2 else 2 if u == 2 else 3} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


# --- LibriSpeech + lexicon -----------------------------------------------------------------
LS_TEXT = ["A CAT", "THE DOG", "A DOG'S CAT", "THE CAT"]
LEXICON = {"A": "AH0", "CAT": "K AE1 T", "THE": "DH AH0", "DOG": "D AO1 G", "DOG'S": "D AO1 G Z"}


def write_librispeech(base: Path) -> Path:
    root = base / "LibriSpeech"
    for subset, spk in (("train-clean-100", "19"), ("dev-clean", "84"), ("test-clean", "61")):
        d = root / subset / spk / "198"
        lines = []
        for i, text in enumerate(LS_TEXT):
            utt = f"{spk}-198-{i:04d}"
            write(d / f"{utt}.flac", tone(200.0 + 150 * i, 0.5 + 0.15 * i, seed=int(spk) + i))
            lines.append(f"{utt} {text}")
        (d / f"{spk}-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def write_lexicon(base: Path) -> Path:
    path = base / "lexicon.txt"
    path.write_text("".join(f"{w}\t{p}\n" for w, p in LEXICON.items()) + "CAT\tK AE0 T\n")
    return path


# --- Audio SNIPS ---------------------------------------------------------------------------
SNIPS_LINES = [
    ("BOS play jazz music EOS", "O O genre genre PlayMusic"),
    ("BOS book a table in paris EOS", "O O O O O city BookRestaurant"),
    ("BOS rate this book EOS", "O O O O RateBook"),
]


def write_snips(base: Path) -> Path:
    root = base / "SNIPS"
    (root).mkdir(parents=True)
    (root / "slots.txt").write_text("slots\ngenre\ncity\n")
    iob = []
    for split, speakers in (("train", ("Ivy", "Joey")), ("valid", ("Amy",)), ("test", ("Emma",))):
        for spk in speakers:
            for i, (sent, tags) in enumerate(SNIPS_LINES):
                uid = f"{spk}-snips-{split}-{i}"
                write(root / split / f"{uid}.wav", tone(250.0 + 200 * i, 0.8, seed=len(iob)))
                iob.append(f"{uid} {sent.upper()}\t{tags}")
    write(root / "train" / "Ivy-snips-train-99.wav", tone(100.0, 0.5, seed=1))  # no transcript: skipped
    (root / "all.iob.snips.txt").write_text("\n".join(iob) + "\n")
    return root


# --- LibriMix (Kaldi folders) --------------------------------------------------------------
def write_librimix(base: Path) -> Path:
    root = base / "librimix"
    for split, n_rec in (("train", 3), ("dev", 1), ("test", 1)):
        d = root / split
        d.mkdir(parents=True)
        scp, seg, u2s, rttm = [], [], [], []
        for r in range(n_rec):
            rec = f"{split}_mix{r}"
            a, b = f"spk{r}a", f"spk{r}b"
            # a: 0.0-1.2 s at 300 Hz, b: 0.8-2.0 s at 800 Hz (overlap 0.8-1.2 s)
            wav = np.zeros(2 * SR, dtype=np.float32)
            wav[: int(1.2 * SR)] += tone(300.0, 1.2, seed=r)
            wav[int(0.8 * SR):] += tone(800.0, 1.2, seed=r + 50)
            write(d / "wavs" / f"{rec}.wav", wav)
            scp.append(f"{rec} {d / 'wavs' / (rec + '.wav')}")
            seg += [f"{rec}_{a} {rec} 0.00 1.20", f"{rec}_{b} {rec} 0.80 2.00"]
            u2s += [f"{rec}_{a} {a}", f"{rec}_{b} {b}"]
            rttm += [f"SPEAKER {rec} 1 0.00 1.20 <NA> <NA> {a} <NA> <NA>",
                     f"SPEAKER {rec} 1 0.80 1.20 <NA> <NA> {b} <NA> <NA>"]
        (d / "wav.scp").write_text("\n".join(scp) + "\n")
        (d / "rttm").write_text("\n".join(rttm) + "\n")
        if split != "test":  # the test folder has only rttm (fallback path)
            (d / "segments").write_text("\n".join(seg) + "\n")
            (d / "utt2spk").write_text("\n".join(u2s) + "\n")
    return root
