"""The espeak-ng binding of the generated corpora: a ctypes wrapper of ``libespeak-ng``
(shipped with its voice data by the ``espeakng-loader`` package, a dependency of adtuning)
and the fresh-process worker that makes a synthesis plan reproducible.

espeak-ng keeps internal state between utterances (pitch flutter, phase), so the output of
one utterance depends on what the library synthesised before it in the same process. Every
corpus therefore synthesises each speaker in a fresh, stdlib-only subprocess that runs a fixed
sequence of utterances (:func:`run_worker`). This module imports only the standard library:
the worker process loads it by path and starts in a few tens of milliseconds.
"""
from __future__ import annotations

import ctypes
import json
import struct
import subprocess
import sys
from pathlib import Path

__all__ = ["ESPEAK_RATE_HZ", "EspeakSynthesizer", "has_breath", "synthesizer", "run_worker", "Item"]

ESPEAK_RATE_HZ = 22050
"""Sample rate of espeak-ng's own output."""

Item = tuple  # (voice, rate, pitch, text) or (voice, rate, pitch, text, pitch_range)
"""One utterance of a synthesis plan."""

# espeak-ng C API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() on bad data
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_EE_OK = 0


class _Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte),
                ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def _default_paths(library: str | None, data: str | None) -> tuple[str, str]:
    """Library and data paths: explicit arguments win, else those of espeakng-loader."""
    if library is not None and data is not None:
        return str(library), str(data)
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "espeak-ng is needed to synthesise the corpus: pip install espeakng-loader "
            "(a dependency of adtuning; reinstall adtuning if it is missing)"
        ) from e
    if library is None:
        library = espeakng_loader.get_library_path()
    if data is None:
        try:
            data = espeakng_loader.get_data_path()
        except RuntimeError as e:
            raise RuntimeError(f"espeak-ng data folder not found: {e}") from e
    return str(library), str(data)


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakSynthesizer:
    """A thin ctypes binding of libespeak-ng in synchronous mode, one per process.

    Args:
        library: path of ``libespeak-ng``; default: the one shipped by espeakng-loader.
        data: path of ``espeak-ng-data``; default: the one shipped by espeakng-loader.

    Raises:
        RuntimeError: the library cannot be loaded or initialised (the message names the
            library path and the data path).

    ``synthesize`` returns the raw int16 samples at :attr:`sample_rate` (22050 Hz). The
    output of one call depends on what was synthesised before it in the same process
    (espeak-ng keeps state between utterances, even across re-initialisation), so
    reproducible corpora run a fixed sequence of calls in a fresh process (see
    :func:`run_worker`). Variants with breath noise are not reproducible
    even then.
    """

    def __init__(self, library: str | None = None, data: str | None = None):
        self.library, self.data = _default_paths(library, data)
        try:
            lib = ctypes.CDLL(self.library)
        except OSError as e:
            raise RuntimeError(f"cannot load the espeak-ng library {self.library}: {e}") from e
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Synchronize.restype = ctypes.c_int
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
            lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
            lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
            lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        except AttributeError as e:
            raise RuntimeError(f"{self.library} is not a usable espeak-ng library: {e}") from e
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 500, self.data.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}) for the espeak-ng library "
                f"{self.library} with data folder {self.data}"
            )
        self._lib = lib
        self.sample_rate = int(rate)
        self.version = (lib.espeak_Info(None) or b"?").decode()
        self._chunks: list[bytes] = []

        def _collect(wav, n, events):  # called by espeak_Synth for each audio chunk
            if wav and n > 0:
                self._chunks.append(ctypes.string_at(wav, 2 * n))
            return 0

        self._callback = _CALLBACK(_collect)  # keep a reference: espeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def set_voice(self, voice: str) -> None:
        """Select ``"<language>"`` or ``"<language>+<variant>"`` (e.g. ``"en-us+f1"``).

        Raises:
            ValueError: espeak-ng does not know the language or the variant.
        """
        lang, _, variant = voice.partition("+")
        vfile = Path(self.data) / "voices" / "!v" / variant
        if not lang or (variant and not vfile.is_file()):
            raise ValueError(f"unknown espeak-ng voice {voice!r} (data folder {self.data})")
        err = self._lib.espeak_SetVoiceByName(voice.encode())
        if err != _EE_OK:
            raise ValueError(
                f"unknown espeak-ng voice {voice!r} (espeak_SetVoiceByName returned {err})"
            )

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int | None = None) -> bytes:
        """Speak ``text``; return native-endian int16 samples at ``sample_rate`` as bytes.

        Args:
            text: what to say (UTF-8).
            voice: as for :meth:`set_voice`.
            rate: words per minute (espeak-ng accepts 80-450).
            pitch: base pitch, 0-100 (50 is the voice's normal pitch).
            pitch_range: intonation range, 0-100 (50 normal, 0 monotone); ``None`` leaves it as
                it is. espeak-ng keeps it for the following utterances of the process.
        """
        self.set_voice(voice)
        self._lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        if pitch_range is not None:
            self._lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
        self._chunks = []
        buf = text.encode("utf-8") + b"\0"
        err = self._lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r} with voice {voice!r}")
        self._lib.espeak_Synchronize()
        return b"".join(self._chunks)

    def phonemes(self, text: str, voice: str) -> list[list[str]]:
        """espeak-ng's own phonemisation of ``text`` (``espeak_TextToPhonemes``): the phonemes
        the synthesiser speaks for it with ``voice``'s language, as espeak-ng's ASCII phoneme
        names with their stress marks (``"'"`` primary, ``","`` secondary) attached, one list
        per phonemised word group. espeak-ng joins unstressed function words to their
        neighbour and links words across boundaries (``;``, ``r-``), so a group is not always
        one word of ``text``.
        """
        self.set_voice(voice)
        buf = ctypes.create_string_buffer(text.encode("utf-8") + b"\0")
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        groups: list[list[str]] = []
        # phonememode: ASCII names (bit 1 clear), "_" between phonemes (bits 8-23); one clause per call
        mode = ord("_") << 8
        while ptr.value:
            out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, mode)
            for group in (out or b"").decode().split():
                groups.append([p for p in group.split("_") if p])
        return groups


    def list_voices(self, variants: bool = False) -> list[tuple[str, tuple[str, ...]]]:
        """espeak-ng's voices (``espeak_ListVoices``) as ``(identifier, languages)`` pairs, e.g.
        ``("gmw/en-US", ("en-us", "en"))``; with ``variants`` the voice variants instead
        (``("!v/m1", ("variant",))``), whose file name is what follows ``+`` in a voice name."""
        spec = None
        if variants:
            spec = _Voice()
            spec.languages = ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)
            self._spec_keepalive = spec
        table = self._lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        out = []
        for i in range(100000):
            if not table[i]:
                break
            v = table[i].contents
            languages, pos = [], v.languages
            while pos:  # <priority byte><language NUL> ... terminated by a zero priority
                if ctypes.string_at(pos, 1) == b"\0":
                    break
                lang = ctypes.string_at(pos + 1)
                languages.append(lang.decode())
                pos += 2 + len(lang)
            out.append(((v.identifier or b"").decode(), tuple(languages)))
        return out


def has_breath(data: str, voice: str) -> bool:
    """Whether the variant of ``voice`` turns on espeak-ng's (irreproducible) breath noise."""
    variant = voice.partition("+")[2]
    if not variant:
        return False
    try:
        lines = (Path(data) / "voices" / "!v" / variant).read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.split()[:1] == ["breath"] for line in lines)


_SYNTHESIZERS: dict[tuple[str, str], EspeakSynthesizer] = {}


def synthesizer(library: str | None, data: str | None) -> EspeakSynthesizer:
    """The in-process synthesizer for these paths (used to validate, never for the corpus)."""
    key = _default_paths(library, data)
    if key not in _SYNTHESIZERS:
        _SYNTHESIZERS[key] = EspeakSynthesizer(*key)
    return _SYNTHESIZERS[key]


def _worker_main() -> int:
    """Subprocess entry: read a JSON job on stdin, write ``<u32 n><n int16>`` per item.

    Runs with the standard library only, so it starts in a few tens of milliseconds.
    """
    job = json.loads(sys.stdin.buffer.read())
    try:
        synth = EspeakSynthesizer(job["library"], job["data"])
        out = sys.stdout.buffer
        for voice, rate, pitch, text, *pitch_range in job["items"]:
            pcm = synth.synthesize(text, voice, rate, pitch, *pitch_range)
            out.write(struct.pack("<I", len(pcm) // 2))
            out.write(pcm)
        out.flush()
    except Exception as e:  # reported by the parent as a RuntimeError
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        return 1
    return 0


_WORKER_BOOT = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_adtuning_espeak_worker', sys.argv[1])\n"
    "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m)\n"
    "sys.exit(m._worker_main())\n"
)


def run_worker(library: str, data: str, items: list[Item]) -> list[bytes]:
    """Synthesise ``items`` in order in a fresh process; return the int16 bytes of each."""
    job = json.dumps({"library": library, "data": data, "items": items}).encode()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _WORKER_BOOT, str(Path(__file__).resolve())],
        input=job, capture_output=True, check=False,
    )
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"espeak-ng worker failed (exit {proc.returncode}, library {library}): "
            + (msg[-1] if msg else "no message")
        )
    raw, pos, out = proc.stdout, 0, []
    for _ in items:
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append(raw[pos : pos + 2 * n])
        pos += 2 * n
    if pos != len(raw):
        raise RuntimeError("espeak-ng worker returned a malformed stream")
    return out

