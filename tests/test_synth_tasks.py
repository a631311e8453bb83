"""The generated SID (VoxCeleb1 layout) and IC (Fluent Speech Commands layout) corpora:
determinism, read back by the real readers, speaker splits, cache, and the CLI end to end."""
from __future__ import annotations

import dataclasses
import json

import pytest

from adtuning import train
from adtuning.embedded import EMBEDDED_CORPORA
from adtuning.speech import synth
from adtuning.speech.corpora import build_dataset
from adtuning.speech.synth_tasks import (FSC_INTENTS, distinct_speakers, generate_fluent_commands,
                                         generate_voxceleb1)

TINY_SID = dict(speakers=4, videos_per_speaker=3, utterances_per_video=2, seed=1)  # 1 train, 1 dev, 1 test video
TINY_IC = dict(speakers=4, held_out_speakers=0.15, seed=2)  # 2 train, 1 valid, 1 test speaker
GENERATORS = {"sid": (generate_voxceleb1, TINY_SID), "ic": (generate_fluent_commands, TINY_IC)}


def _generate(task, root, **overrides):
    fn, kwargs = GENERATORS[task]
    return fn(root, progress=False, jobs=2, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_tasks")
    return {task: _generate(task, base / task) for task in GENERATORS}


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_same_call_gives_the_same_bytes(task, corpora, tmp_path):
    again = _files(_generate(task, tmp_path / task))
    assert again == _files(corpora[task])
    assert sum(name.endswith(".wav") for name in again) > 0


def test_sid_layout_is_read_by_the_voxceleb1_reader(corpora):
    root = corpora["sid"]
    assert (root / "iden_split.txt").is_file()
    for split in ("train", "dev", "test"):
        ds = build_dataset("sid", root, split)
        assert len(ds) == 4 * 1 * 2  # speakers x videos of the split x utterances per video
        assert ds.task_kwargs == {"num_classes": 4}
        assert sorted({label for _, label in ds.items}) == [0, 1, 2, 3]  # closed set: every speaker in every split
        sample = ds.load(0)
        assert sample["wav"].ndim == 1 and 0.2 * synth.SAMPLE_RATE < len(sample["wav"]) <= 3 * synth.SAMPLE_RATE
    assert sorted(p.name for p in (root / "wav").iterdir()) == ["id10001", "id10002", "id10003", "id10004"]
    # Dev and test are whole held-out sessions (videos), never a training video.
    videos = {}
    for line in (root / "iden_split.txt").read_text().splitlines():
        which, rel = line.split()
        videos.setdefault(which, set()).add(rel.rsplit("/", 1)[0])
    assert not (videos["1"] & videos["2"]) and not (videos["1"] & videos["3"]) and not (videos["2"] & videos["3"])


def test_ic_layout_is_read_by_the_fluent_reader(corpora):
    root = corpora["ic"]
    sizes = {"train": 2 * 31, "dev": 31, "test": 31}
    speakers = {}
    for split, n in sizes.items():
        ds = build_dataset("ic", root, split)
        assert len(ds) == n
        assert ds.task_kwargs == {"values_per_slot": [6, 14, 4]}
        intents = {tuple(ds.slot_values[k][v] for k, v in enumerate(labels)) for _, labels in ds.items}
        assert intents == set(FSC_INTENTS)  # every speaker says every intent
        speakers[split] = {path.parent.name for path, _ in ds.items}
        assert all(path.is_file() for path, _ in ds.items)
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["dev"] & speakers["test"])
    assert (len(speakers["train"]), len(speakers["dev"]), len(speakers["test"])) == (2, 1, 1)


def test_speakers_are_disjoint_from_pretraining_and_between_tasks(corpora):
    pretraining = set(synth.pretraining_speakers(64, 0))
    for task, root in corpora.items():
        triples = {tuple(s[:3]) for s in json.loads((root / synth.MANIFEST_NAME).read_text())["params"]["speakers"]}
        assert triples and not triples & pretraining
        assert all(pitch % 2 == 0 for _, _, pitch in triples)  # default_speakers' even pitches
    # The embedded defaults: distinct seeds, so the SID and IC corpora share no speaker either.
    sid_params, ic_params = EMBEDDED_CORPORA["sid"].params, EMBEDDED_CORPORA["ic"].params
    sid = set(distinct_speakers(sid_params["speakers"], sid_params["seed"]))
    ic = set(synth.default_speakers(ic_params["speakers"], ic_params["seed"]))
    assert len(sid) == 32 and not sid & ic and not (sid | ic) & set(synth.pretraining_speakers(64, 0))


def test_sid_speakers_of_one_voice_differ_in_pitch_or_rate():
    kept = distinct_speakers(32, 1)
    for a, (va, ra, pa) in enumerate(kept):
        for vb, rb, pb in kept[a + 1:]:
            assert va != vb or abs(pa - pb) >= 6 or abs(ra - rb) >= 20


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_half_written_or_changed_cache_is_regenerated(task, tmp_path):
    root = _generate(task, tmp_path / task)
    reference = _files(root)
    manifest = root / synth.MANIFEST_NAME
    wav = next(root.rglob("*.wav"))
    wav.unlink()
    assert _generate(task, root) == root and not wav.exists()  # complete manifest: cached, not checked file by file
    manifest.unlink()  # as after an interrupted generation: the manifest is written last
    _generate(task, root)
    assert _files(root) == reference
    manifest.write_text("{not json")
    next(root.rglob("*.wav")).write_bytes(b"junk")
    _generate(task, root)
    assert _files(root) == reference
    _generate(task, root, seed=7)  # other parameters: regenerated
    assert json.loads(manifest.read_text())["params"]["seed"] == 7


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_foreign_folder_is_never_replaced(task, tmp_path):
    (tmp_path / task).mkdir()
    (tmp_path / task / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        _generate(task, tmp_path / task)
    assert (tmp_path / task / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_cli_runs_the_embedded_corpus_end_to_end(task, tmp_path, monkeypatch, capsys):
    corpus = EMBEDDED_CORPORA[task]
    monkeypatch.setitem(EMBEDDED_CORPORA, task, dataclasses.replace(corpus, params=GENERATORS[task][1]))
    folder = corpus.folder
    out = tmp_path / "run"
    argv = ["--task", task, "--steps", "4", "--batch-size", "4", "--fisher-samples", "8", "--eval-interval", "2",
            "--no-progress", "--log-level", "WARNING", "--output-dir", str(out), "--corpus-cache", str(tmp_path / "cache")]
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "test" in summary["final"]
    assert (tmp_path / "cache" / folder / synth.MANIFEST_NAME).is_file()


def test_tasks_without_an_embedded_corpus_still_need_data_dir(tmp_path, capsys):
    assert train.main(["--task", "sf", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--data-dir" in capsys.readouterr().err
