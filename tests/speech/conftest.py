"""Session fixture with every tiny corpus (writers in ``speech_fixtures``)."""
from __future__ import annotations

import pytest
from speech_fixtures import (
    write_fluent,
    write_lexicon,
    write_librimix,
    write_librispeech,
    write_snips,
    write_speech_commands,
    write_voxceleb,
)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """Paths of every fixture corpus (written once per session)."""
    base = tmp_path_factory.mktemp("corpora")
    return {
        "ks": write_speech_commands(base / "ks"),
        "ic": write_fluent(base / "ic"),
        "sid": write_voxceleb(base / "sid"),
        "asr": write_librispeech(base / "ls"),
        "lexicon": write_lexicon(base / "ls"),
        "sf": write_snips(base / "sf"),
        "sd": write_librimix(base / "sd"),
    }
