"""A generated Audio-SNIPS-layout corpus for slot filling (SF).

Synthesised with espeak-ng through :mod:`adtuning.speech.synthesis` (one fresh espeak-ng process per
speaker, so equal arguments give byte-identical files) and read unchanged by
:class:`~adtuning.speech.corpora.SnipsDataset`. :func:`generate_snips` writes::

    <root>/                                          # the role of SNIPS/
        train/<Speaker>-snips-train-<k>.wav          # 16 kHz mono PCM-16
        valid/<Speaker>-snips-valid-<k>.wav
        test/<Speaker>-snips-test-<k>.wav
        all.iob.snips.txt        # "<uid> BOS W1 ... Wn EOS<TAB>O t1 ... tn <Intent>", t = slot name or O
        slots.txt                # "O", then the slot names, sorted (the readers skip the first line)
        adtuning_synth.json      # manifest (parameters + version), written last

The sixteen speakers carry the names of the s3prl recipe's Amazon Polly voices (train: Ivy,
Joanna, Joey, Justin, Kendra, Kimberly, Matthew, Salli; valid: Aditi, Amy, Geraint, Nicole; test:
Brian, Emma, Raveena, Russell: :data:`adtuning.speech.corpora.snips.SPEAKERS`), each a
:func:`~adtuning.speech.speakers.default_speakers` voice (even base pitches, so disjoint from the
embedded upstream's pre-training speakers). The held-out speakers use the same voice variants as
the training speakers, in the other English accent: ``default_speakers(22, seed)`` numbers 0-7
train, 14-17 valid, 18-21 test.

Sentences come from templates of SNIPS's seven intents (:data:`SNIPS_TEMPLATES`) with slot
values drawn from small lists (:data:`SNIPS_SLOT_VALUES`), upper case as s3prl's transcripts;
each sentence is read by one speaker of its split. The slot tags are exact by construction: the
words of a slot value carry its slot name, every other word ``O``, and no template puts two
values of one slot side by side (a run of equal tags is one value).
"""
from __future__ import annotations

import os
from pathlib import Path

from adtuning.speech import synthesis
from adtuning.speech.speakers import default_speakers

__all__ = ["SNIPS_CORPUS_VERSION", "SNIPS_TEMPLATES", "SNIPS_SLOT_VALUES", "snips_speakers", "snips_sentence",
           "generate_snips"]

SNIPS_CORPUS_VERSION = 1
"""Bumped whenever the corpus's bytes change for equal parameters; invalidates caches."""

SNIPS_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Short commands, as spoken to an assistant: most of each utterance is slot values, which is
    # what slot filling scores (long carrier phrases only lengthen the CTC targets).
    "AddToPlaylist": (
        "add {artist} to {playlist}",
        "put this {music_item} on {playlist}",
        "add the {music_item} to {playlist}",
        "add {artist} to my {playlist} list",
    ),
    "BookRestaurant": (
        "book a {restaurant_type} for {party_size_number}",
        "table for {party_size_number} in {city}",
        "book a {restaurant_type} {timeRange}",
        "find a {restaurant_type} with {served_dish}",
    ),
    "GetWeather": (
        "weather in {city} {timeRange}",
        "will it be {condition_description} in {city}",
        "is it {condition_temperature} {timeRange}",
        "forecast for {state}",
    ),
    "PlayMusic": (
        "play some {genre}",
        "play {artist}",
        "play {artist} on {service}",
        "play {genre} from the {year}",
    ),
    "RateBook": (
        "rate this {object_type} {rating_value} out of {best_rating}",
        "give {object_name} {rating_value} stars",
        "rate {object_name} {rating_value}",
        "this {object_type} gets {rating_value} points",
    ),
    "SearchCreativeWork": (
        "find the {object_type} {object_name}",
        "look for {object_name}",
        "show me {object_name}",
        "search for the {object_type} {object_name}",
    ),
    "SearchScreeningEvent": (
        "when is {movie_name} playing",
        "show times for {movie_name} at {location_name}",
        "is {movie_name} on {timeRange}",
        "films at {location_name} {timeRange}",
    ),
}
"""Templates per SNIPS intent (``{slot}`` marks a slot value; everything else is tagged ``O``)."""

SNIPS_SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "artist": ("madonna", "elton john", "bob marley", "taylor swift", "miles davis", "frank sinatra", "the beatles",
               "nina simone"),
    "playlist": ("road trip", "summer hits", "morning coffee", "workout", "chill evening", "rainy day", "party mix"),
    "music_item": ("song", "track", "album", "tune"),
    "party_size_number": ("two", "three", "four", "five", "six", "eight"),
    "restaurant_type": ("pizzeria", "steakhouse", "diner", "bistro", "sushi bar", "tavern", "cafe"),
    "city": ("boston", "chicago", "denver", "london", "paris", "seattle", "new york", "berlin", "dallas"),
    "timeRange": ("tomorrow", "tonight", "this weekend", "next monday", "at noon", "on friday", "this evening"),
    "served_dish": ("pasta", "dumplings", "tacos", "noodles", "pancakes", "seafood"),
    "condition_description": ("rainy", "cloudy", "windy", "foggy", "sunny", "stormy"),
    "condition_temperature": ("cold", "hot", "warm", "chilly", "freezing"),
    "state": ("texas", "ohio", "oregon", "florida", "nevada", "maine", "georgia"),
    "genre": ("jazz", "blues", "rock", "reggae", "techno", "country", "folk", "soul"),
    "service": ("spotify", "youtube", "pandora", "deezer", "the radio"),
    "year": ("sixties", "seventies", "eighties", "nineties"),
    "object_type": ("book", "novel", "album", "song", "movie", "game", "painting"),
    "object_name": ("the hobbit", "moby dick", "little women", "the odyssey", "dracula", "treasure island",
                    "black beauty", "the jungle book"),
    "rating_value": ("one", "two", "three", "four", "five"),
    "best_rating": ("five", "six", "ten"),
    "movie_name": ("star wars", "the lion king", "jaws", "frozen", "titanic", "the matrix", "toy story", "rocky"),
    "location_name": ("the regal cinema", "the plaza theater", "the drive in", "the grand movies", "cinema city"),
}
"""Slot values per slot name (lower case here; written upper case)."""

_NAMES = {
    "training": ("Ivy", "Joanna", "Joey", "Justin", "Kendra", "Kimberly", "Matthew", "Salli"),
    "validation": ("Aditi", "Amy", "Geraint", "Nicole"),
    "testing": ("Brian", "Emma", "Raveena", "Russell"),
}
_FOLDER = {"training": "train", "validation": "valid", "testing": "test"}
# default_speakers indices of each split: 0-7 train; 14-21 the same variants, other accent.
_INDICES = {"training": range(0, 8), "validation": range(14, 18), "testing": range(18, 22)}


def snips_speakers(seed: int) -> dict[str, tuple[str, int, int]]:
    """Speaker name -> (voice, rate, pitch): the recipe's sixteen names, in split order."""
    pool = default_speakers(22, seed)
    return {name: pool[j] for split in _NAMES for name, j in zip(_NAMES[split], _INDICES[split])}


def snips_sentence(intent: str, template: str, values: dict[str, str]) -> tuple[list[str], list[str]]:
    """Upper-case words and their tags (slot name or ``O``) of one filled template."""
    words, tags = [], []
    for token in template.split():
        if token.startswith("{") and token.endswith("}"):
            slot = token[1:-1]
            for w in values[slot].split():
                words.append(w.upper())
                tags.append(slot)
        else:
            words.append(token.upper())
            tags.append("O")
    return words, tags


def _check_templates() -> None:
    for intent, templates in SNIPS_TEMPLATES.items():
        for t in templates:
            slots = [tok[1:-1] for tok in t.split() if tok.startswith("{")]
            missing = [s for s in slots if s not in SNIPS_SLOT_VALUES]
            if missing:
                raise ValueError(f"SNIPS template {t!r} ({intent}) uses slots without values: {missing}")
            toks = t.split()
            for a, b in zip(toks, toks[1:]):
                if a.startswith("{") and a == b:
                    raise ValueError(f"SNIPS template {t!r} ({intent}) puts two {a} values side by side")


def generate_snips(
    root: str | os.PathLike,
    *,
    train_sentences: int = 800,
    valid_sentences: int = 120,
    test_sentences: int = 120,
    seed: int = 4,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Synthesise an Audio-SNIPS-layout slot-filling corpus into ``root`` (cached: nothing is done
    when ``root`` holds a complete corpus with equal parameters).

    Args:
        root: the folder to create (the role of ``SNIPS``; replaced only if this module made it,
            or it is empty).
        train_sentences, valid_sentences, test_sentences: sentences per split; sentence ``k`` of
            a split is read by its speaker ``k mod 8`` (train) or ``k mod 4`` (valid, test).
        seed: speakers, intents, templates, slot values, jitter and gains derive from it.
        progress: a tqdm bar.
        jobs: parallel espeak-ng processes (default: CPU count, at most 4); output unchanged.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root).absolute()
    counts = {"training": train_sentences, "validation": valid_sentences, "testing": test_sentences}
    for split, n in counts.items():
        if n < len(_NAMES[split]):
            raise ValueError(f"{_FOLDER[split]}_sentences must be at least {len(_NAMES[split])} (one per speaker), got {n}")
    _check_templates()
    speakers = snips_speakers(seed)
    params = {"speakers": {k: list(v) for k, v in speakers.items()}, "sentences": {_FOLDER[s]: int(n) for s, n in counts.items()},
              "templates": {k: list(v) for k, v in SNIPS_TEMPLATES.items()},
              "slot_values": {k: list(v) for k, v in SNIPS_SLOT_VALUES.items()}, "seed": int(seed),
              "sample_rate": synthesis.SAMPLE_RATE}
    key = {"generator": "adtuning.speech.synth_snips.generate_snips", "version": SNIPS_CORPUS_VERSION, "params": params}

    intents = sorted(SNIPS_TEMPLATES)
    names = [name for split in _NAMES for name in _NAMES[split]]
    plans: list[list] = [[] for _ in names]
    meta: list[list] = [[] for _ in names]  # meta[j][i] = (wav path, iob line)
    for split, n in counts.items():
        for k in range(n):
            r = synthesis.rng("sf-sentence", seed, split, k)
            intent = intents[int(r.integers(len(intents)))]
            template = SNIPS_TEMPLATES[intent][int(r.integers(len(SNIPS_TEMPLATES[intent])))]
            slots = sorted({tok[1:-1] for tok in template.split() if tok.startswith("{")})
            values = {s: SNIPS_SLOT_VALUES[s][int(r.integers(len(SNIPS_SLOT_VALUES[s])))] for s in slots}
            words, tags = snips_sentence(intent, template, values)
            name = _NAMES[split][k % len(_NAMES[split])]
            j = names.index(name)
            voice, rate, pitch = speakers[name]
            uid = f"{name}-snips-{_FOLDER[split]}-{k}"
            plans[j].append((voice, *synthesis.jitter(("sf", seed, split, k), rate, pitch, 1.0, 0.08, 3), " ".join(words).lower()))
            meta[j].append((f"{_FOLDER[split]}/{uid}.wav",
                            f"{uid} BOS {' '.join(words)} EOS\tO {' '.join(tags)} {intent}\n"))

    def write(tmp: Path, j: int, i: int, pcm: bytes) -> None:
        y = synthesis.render_utterance(pcm, synthesis.rng("sf-gain", seed, j, i), None, (28.0, 42.0), threshold=0.002)
        synthesis.write_wav(tmp / meta[j][i][0], y)

    def finish(tmp: Path) -> int:
        lines = sorted(line for info in meta for _, line in info)
        (tmp / "all.iob.snips.txt").write_text("".join(lines), encoding="utf-8")
        (tmp / "slots.txt").write_text("\n".join(["O", *sorted(SNIPS_SLOT_VALUES)]))
        return len(lines)

    return synthesis.synthesise_corpus(root, key, plans, write, finish, desc="synthesising SF corpus (Audio SNIPS layout)",
                                   progress=progress, jobs=jobs)
