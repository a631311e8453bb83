"""Rebuild ``adtuning/speech/assets/pretraining_words_v2.txt``, the vocabulary of the v2
pre-training corpus, from material already on a Debian machine (nothing is downloaded).

Sources, merged in this order (a word is kept once, at its first place):

1. ``assets/pretraining_words.txt`` (v1's 501 common words);
2. words of 2-12 lower-case letters with at least one vowel that occur in at least
   ``--min-files`` English documents of ``/usr/share/man/man{1,5,7,8}`` and ``/usr/share/doc``
   (Google Cloud SDK pages left out: they repeat one vocabulary thousands of times), by
   decreasing document frequency (two-letter words need ten times as many documents);
3. the words of espeak-ng's own English dictionary (``en_dict``: the entries whose
   pronunciation the rules do not give; many common words, names and loans), decoded from its
   6-bit packed spelling.

Usage: ``python bench/make_pretraining_words.py [--min-files 40] [--output PATH]``.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import pathlib
import re

TOKEN = re.compile(r"(?<![A-Za-z0-9_\\.-])[a-z]{2,12}(?![A-Za-z0-9_(\\-])")
ASSETS = pathlib.Path(__file__).resolve().parents[1] / "adtuning" / "speech" / "assets"


def document_frequency() -> collections.Counter:
    files = [p for d in ("man1", "man5", "man7", "man8") if pathlib.Path("/usr/share/man", d).is_dir()
             for p in pathlib.Path("/usr/share/man", d).iterdir() if not p.name.startswith(("gcloud", "bq", "gsutil"))]
    files += [p for p in pathlib.Path("/usr/share/doc").rglob("*") if p.is_file() and p.suffix in (".gz", ".txt", ".md", "")
              and "copyright" not in p.name and "google" not in str(p)]
    df: collections.Counter = collections.Counter()
    for p in sorted(files):
        try:
            raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        except (OSError, EOFError):
            continue
        text = raw.decode("utf-8", "replace")
        if "/man/" in str(p):
            text = re.sub(r"\\f[A-Z]|\\\(..|\\[-&e]|^\..*$", " ", text, flags=re.M)
        df.update(set(TOKEN.findall(text)))
    return df


def espeak_dictionary_words() -> list[str]:
    """The packed (6-bit, a=1 ... z=26) spellings of espeak-ng's ``en_dict`` hash chains."""
    import espeakng_loader

    b = (pathlib.Path(espeakng_loader.get_data_path()) / "en_dict").read_bytes()
    p, out = 8, []
    for _ in range(1024):
        while b[p] != 0:
            length, flags = b[p], b[p + 1]
            if flags & 0x40:
                bits = "".join(f"{x:08b}" for x in b[p + 2:p + 2 + (flags & 0x3F)])
                word = ""
                for i in range(0, len(bits) - 5, 6):
                    c = int(bits[i:i + 6], 2)
                    if not 1 <= c <= 26:
                        word = "" if c else word
                        break
                    word += chr(96 + c)
                if word:
                    out.append(word)
            p += length
        p += 1
    return sorted(set(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-files", type=int, default=40)
    parser.add_argument("--output", type=pathlib.Path, default=ASSETS / "pretraining_words_v2.txt")
    args = parser.parse_args()
    v1 = [w for line in (ASSETS / "pretraining_words.txt").read_text().splitlines() if not line.startswith("#") for w in line.split()]
    df = document_frequency()
    docs = [w for w, c in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))
            if re.search("[aeiouy]", w) and c >= args.min_files * (10 if len(w) == 2 else 1)]
    espeak = [w for w in espeak_dictionary_words() if 2 <= len(w) <= 12 and re.search("[aeiouy]", w)]
    words = list(dict.fromkeys(v1 + docs + espeak))
    header = ("# Vocabulary of the v2 pre-training corpus, most frequent first (built by bench/make_pretraining_words.py:\n"
              f"# v1's {len(v1)} words, words of >= {args.min_files} English man/doc pages of a Debian machine, espeak-ng's en_dict).\n")
    body = "".join(" ".join(words[i:i + 16]) + "\n" for i in range(0, len(words), 16))
    args.output.write_text(header + body)
    print(f"{args.output}: {len(words)} words ({len(v1)} v1, {len(docs)} from documents, {len(espeak)} from en_dict)")


if __name__ == "__main__":
    main()
