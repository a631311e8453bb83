"""Generation time of the default generated Speech Commands corpus, against a cache hit of the
same corpus in the same run (formerly wall-clock assertions in tests/test_synth.py: the default
corpus in under 60 s, a cache hit in under 1 s).

Usage: ``python bench/synth_speed.py [--repeats 3]``. Prints the seconds of each fresh
generation and of each cache hit, and their ratio (how many cache hits one generation costs).
Run it on an idle machine: timings of a shared machine say nothing.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from adtuning.speech.synth import generate_speech_commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fresh, hits = [], []
    for _ in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="adtuning-synth-speed-"))
        try:
            root = folder / "speech_commands_v0.01"
            t0 = time.perf_counter()
            generate_speech_commands(root, progress=False)
            fresh.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            generate_speech_commands(root, progress=False)
            hits.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    f, h = statistics.median(fresh), statistics.median(hits)
    print(f"default corpus: generation {f:.2f} s (median of {fresh}), cache hit {h:.4f} s (median of {hits}); "
          f"generation / cache hit = {f / max(h, 1e-9):.0f}x")


if __name__ == "__main__":
    main()
