"""Self-supervised speech upstreams (wav2vec 2.0, HuBERT, WavLM) from transformers.

The upstream returns *all* hidden states, s3prl style: the input of every transformer layer
(for post-LN models the first one is the normalised CNN projection plus positional
convolution) followed by the encoder output (for stable-layer-norm models: after the final
layer norm). They are collected with forward pre-hooks on the encoder layers rather than with
``output_hidden_states``, because transformers 5.x records hidden states differently from 4.x
for stable-layer-norm models (5.x does not apply the final layer norm to the last entry); the
hooks give the same list on every version.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")


class UpstreamLoadError(RuntimeError):
    """An upstream could not be built or loaded."""


def _tiny_common(stable: bool) -> dict:
    # Real models have a 320-sample frame stride (50 frames/s); the tiny ones keep it so that
    # frame-rate dependent recipes (SD label tiling) behave as with a real upstream.
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 8, 4),
        conv_stride=(5, 8, 8),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=stable,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        apply_spec_augment=False,
        vocab_size=8,
    )


def _tiny_config(name: str):
    from transformers import HubertConfig, Wav2Vec2Config, WavLMConfig

    if name == "tiny-wav2vec2":
        return Wav2Vec2Config(**_tiny_common(stable=False))
    if name == "tiny-wav2vec2-stable":
        return Wav2Vec2Config(**_tiny_common(stable=True))
    if name == "tiny-hubert":
        return HubertConfig(**_tiny_common(stable=True))
    if name == "tiny-wavlm":
        return WavLMConfig(**_tiny_common(stable=False), num_buckets=32, max_bucket_distance=64)
    raise KeyError(name)


EMBEDDED_UPSTREAMS = ("adtuning-hubert-mini", "adtuning-hubert-small")
"""Pre-trained upstreams shipped inside the package (``adtuning/speech/assets/<name>/``).

``adtuning-hubert-mini``: a 1.04M-parameter HuBERT (hidden 128, 4 layers, light 7-layer CNN
with the base models' 320-sample frame stride) pre-trained on CPU by
``python -m adtuning.pretrain`` (HuBERT iteration 1: masked prediction of MFCC k-means
targets) on an espeak-ng corpus whose speakers are disjoint from every downstream corpus's;
its ``pretraining.json`` records the command, seed, wall time and held-out accuracy. It is
the default upstream of the embedded runs.

``adtuning-hubert-small``: upstream v2, a 5.19M-parameter HuBERT (hidden 256, 6 layers, the same
CNN and 20 ms frames), shipped in bfloat16, pre-trained by ``python -m adtuning.pretrain --corpus v2``
with HuBERT's two iterations (MFCC k-means targets, then k-means of layer 4 of the iteration-1
model) on the v2 corpus (every usable English espeak-ng voice and variant except the held-out
ones, a 9,967-word vocabulary) degraded on the fly (noise, babble, rooms, speed, pitch,
band-limiting, gain). The pre-training runs in the background over several sessions and is
exported as it goes: ``pretraining.json`` says how far (``complete``, ``iteration``, ``step``,
CPU-hours, held-out masked accuracy). Not the default until it meets the default run's targets."""

DEFAULT_UPSTREAM = "adtuning-hubert-mini"
"""The upstream of ``python -m adtuning.train`` when ``--upstream`` is not given."""


def embedded_upstream_dir(name: str) -> Path:
    """Folder of a shipped upstream (``config.json``, ``model.safetensors``, ``pretraining.json``)."""
    if name not in EMBEDDED_UPSTREAMS:
        raise UpstreamLoadError(f"unknown embedded upstream {name!r}; known: {', '.join(EMBEDDED_UPSTREAMS)}")
    from importlib import resources

    folder = Path(str(resources.files("adtuning.speech").joinpath("assets", name)))
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UpstreamLoadError(f"the embedded upstream {name!r} is missing from {folder} (broken installation?)")
    return folder


TINY_UPSTREAMS = ("tiny-wav2vec2", "tiny-wav2vec2-stable", "tiny-hubert", "tiny-wavlm")
"""Names :func:`build_upstream` builds in code with random weights (tests, embedded default).

``tiny-wav2vec2`` and ``tiny-wavlm`` are post-layer-norm; ``tiny-hubert`` and
``tiny-wav2vec2-stable`` use the stable (pre-) layer norm of the large models. All use
``feat_extract_norm="layer"``, so a sample's outputs do not depend on how it is padded."""


def _disable_training_noise(config) -> None:
    # LayerDrop skips layers at random, which breaks the weighted sum (s3prl issue #139);
    # SpecAugment masking inside the upstream is not part of the SUPERB recipes either.
    config.layerdrop = 0.0
    config.apply_spec_augment = False
    config.mask_time_prob = 0.0
    config.mask_feature_prob = 0.0


class Upstream(nn.Module):
    """A transformers SSL model wrapped to return all hidden states and frame lengths.

    Args:
        model: a ``Wav2Vec2Model``, ``HubertModel`` or ``WavLMModel``.
        normalize_waveform: zero-mean/unit-variance normalise every waveform over its valid
            samples before the CNN. ``None``: do it for models whose CNN uses layer norm
            (``feat_extract_norm == "layer"``, the large/LV-60 family), as fairseq and s3prl
            do, and not for group-norm models (base).
        name: where the model came from (for logs).

    The CNN feature encoder is frozen (``requires_grad=False``); layerdrop and in-model
    SpecAugment are disabled. Parameter names, e.g. ``model.encoder.layers.0.attention.q_proj.weight``,
    are relative to this module.
    """

    def __init__(self, model: nn.Module, *, normalize_waveform: bool | None = None, name: str = ""):
        super().__init__()
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise UpstreamLoadError(
                f"unsupported upstream model type {getattr(config, 'model_type', None)!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "add_adapter", False):
            raise UpstreamLoadError("upstreams with a transformers adapter (add_adapter=True) are not supported")
        _disable_training_noise(config)
        self.model = model
        self.name = name or getattr(config, "_name_or_path", "") or config.model_type
        fe = self.model.feature_extractor
        for p in fe.parameters():
            p.requires_grad_(False)
        if hasattr(fe, "_requires_grad"):
            fe._requires_grad = False  # otherwise the CNN input is made to require grad
        if normalize_waveform is None:
            normalize_waveform = config.feat_extract_norm == "layer"
        self.normalize_waveform = bool(normalize_waveform)
        self._captured: list[torch.Tensor] | None = None
        self._hooks = [
            layer.register_forward_pre_hook(self._capture_input, with_kwargs=True)
            for layer in self.model.encoder.layers
        ]

    # -- properties ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Feature dimension D of every hidden state."""
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of hidden states returned by :meth:`forward` (transformer layers + 1)."""
        return len(self.model.encoder.layers) + 1

    @property
    def frame_stride(self) -> int:
        """Waveform samples per output frame (320 for the published models)."""
        return int(math.prod(self.model.config.conv_stride))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights."""
        return next(self.model.parameters()).dtype

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for waveforms of ``wav_lengths`` samples ([B] long)."""
        return self.model._get_feat_extract_output_lengths(wav_lengths).to(torch.long)

    def default_scored_parameters(self) -> list[str]:
        """Names of the parameters a CHILD-TUNING Fisher pass scores by default.

        Every parameter of the transformer encoder layers (``model.encoder.layers.*``:
        attention q/k/v/out projections, layer norms, feed-forward; WavLM's relative-position
        parameters too) -- about 85M entries for a base model. The CNN, the feature projection,
        the positional convolution and the encoder's final layer norm are not included.
        """
        return [n for n, _ in self.named_parameters() if n.startswith("model.encoder.layers.")]

    # -- forward ------------------------------------------------------------------------------
    def _capture_input(self, module, args, kwargs):
        if self._captured is not None:
            self._captured.append(args[0] if args else kwargs["hidden_states"])

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the model on a zero-padded batch.

        Args:
            wav: ``[B, L]`` float waveforms at 16 kHz, zero beyond each length.
            wav_lengths: ``[B]`` long, valid samples per waveform.

        Returns:
            ``(hidden_states, frame_lengths)``: a list of :attr:`num_layers` tensors
            ``[B, T, D]`` in the model dtype, and ``[B]`` long valid frames per sample.
            Frames at or beyond a sample's length are padding and must be ignored.
        """
        if wav.dim() != 2:
            raise ValueError(f"wav must be [B, L], got shape {tuple(wav.shape)}")
        wav_lengths = wav_lengths.to(device=wav.device, dtype=torch.long)
        frame_lengths = self.frame_lengths(wav_lengths)
        wav, mask = prepare_waveforms(wav, wav_lengths, normalize=self.normalize_waveform)
        wav = wav.to(self.dtype)
        self._captured = []
        try:
            out = self.model(wav, attention_mask=mask.to(torch.long))
            hidden = self._captured + [out.last_hidden_state]
        finally:
            self._captured = None
        if len(hidden) != self.num_layers:
            raise RuntimeError(f"captured {len(hidden)} hidden states, expected {self.num_layers}")
        return hidden, frame_lengths


def prepare_waveforms(wav: torch.Tensor, wav_lengths: torch.Tensor, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the padding of a ``[B, L]`` batch and, with ``normalize``, give every waveform zero
    mean and unit variance over its valid samples (fairseq/s3prl for layer-norm CNNs).

    Returns ``(float32 waveforms, [B, L] bool mask of valid samples)``. The pre-training
    recipe uses it too, so the shipped upstream sees the same input at fine-tuning time.
    """
    mask = torch.arange(wav.shape[1], device=wav.device)[None, :] < wav_lengths[:, None]
    wav = wav.float() * mask
    if normalize:
        n = wav_lengths.clamp(min=1).to(wav.dtype)[:, None]
        mean = wav.sum(1, keepdim=True) / n
        var = ((wav - mean) * mask).pow(2).sum(1, keepdim=True) / n
        wav = (wav - mean) * torch.rsqrt(var + 1e-5) * mask
    return wav, mask


def _load_dtype_kwargs(dtype: torch.dtype) -> dict:
    """The ``from_pretrained`` argument that loads the weights directly in ``dtype``, tensor by
    tensor (``dtype=`` since transformers 4.56, ``torch_dtype=`` before): a bf16 upstream read
    from an fp32 checkpoint never allocates an fp32 copy of the model. (transformers 5 memory-maps
    a safetensors file while it reads it, and until loading ends its touched pages count in the
    RSS: :func:`_from_pretrained_by_reads` reads local files without the map.)"""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _local_safetensors(source: str) -> list[Path] | None:
    """The safetensors files of a local checkpoint folder (one file or the shards its index
    names), or None when ``source`` is not such a folder."""
    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamLoadError(f"cannot read the shard index {index}: {exc}") from exc
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def _from_pretrained_by_reads(model_class, files: list[Path], config, dtype: torch.dtype) -> nn.Module | None:
    """``model_class.from_pretrained`` on the tensors of ``files`` read with ``pread`` instead of a
    memory map, each converted to ``dtype`` as it is read: the peak is the weights in ``dtype``
    plus the few tensors in flight. (A memory-mapped fp32 file keeps every page it has read
    mapped until loading ends: 2x the bf16 weights on top of them.) Transformers still does the
    key renaming, prefixes and missing-key initialisation as for a folder.

    Returns None where safetensors has no ``pread`` backend (older versions)."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        tensors = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            except TypeError:  # safetensors without the backend argument
                return None
            for key in handle.keys():
                tensors[key] = handle.get_slice(key)  # read when transformers materialises it
        return model_class.from_pretrained(None, config=config, state_dict=tensors, **_load_dtype_kwargs(dtype))


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (its "Loading weights" bar) on or off inside the block,
    as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _load_pretrained(source: str, config, dtype: torch.dtype, local_files_only: bool, progress: bool = True) -> nn.Module:
    """The base model of ``source`` in ``dtype``: read tensor by tensor from a local safetensors
    folder, else through ``AutoModel.from_pretrained`` (hub cache, ``.bin``); ``progress``:
    transformers' loading bar."""
    from transformers import MODEL_MAPPING, AutoModel

    files = _local_safetensors(source)
    model_class = MODEL_MAPPING.get(type(config), None) if files else None
    with _transformers_progress(progress):
        if model_class is not None:
            model = _from_pretrained_by_reads(model_class, files, config, dtype)
            if model is not None:
                return model
        return AutoModel.from_pretrained(source, config=config, local_files_only=local_files_only, **_load_dtype_kwargs(dtype))


def _finish(model: nn.Module, *, dtype: torch.dtype, gradient_checkpointing: bool, name: str,
            normalize_waveform: bool | None) -> Upstream:
    # A no-op for models loaded in ``dtype`` (Module.to keeps tensors already in it); converts the
    # tiny random models, built in fp32 so that their values stay those every saved delta of them
    # was fingerprinted with (they are well under a megabyte: the transient copy is negligible).
    model = model.to(dtype)
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps the hooked layer inputs connected to the graph.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            try:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            except TypeError as exc:  # transformers < 4.35 only has reentrant checkpointing
                raise UpstreamLoadError(
                    "gradient checkpointing needs transformers >= 4.35 (non-reentrant checkpointing); "
                    "the installed version cannot keep the hidden states of checkpointed layers differentiable"
                ) from exc
    return Upstream(model, normalize_waveform=normalize_waveform, name=name)


def build_upstream(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    normalize_waveform: bool | None = None,
    seed: int = 0,
    local_files_only: bool = True,
    progress: bool = True,
) -> Upstream:
    """Build or load an upstream.

    Args:
        name_or_path: one of :data:`EMBEDDED_UPSTREAMS` (pre-trained, shipped in the
            package), one of :data:`TINY_UPSTREAMS` (a small random model built in code,
            initialised from ``seed``), or anything ``from_pretrained`` accepts: a local
            directory holding ``config.json`` and weights, or a hub id already in the local
            cache. Checkpoints of ``*ForCTC`` / ``*ForPreTraining`` models load their base model.
        dtype: weight dtype (``torch.bfloat16`` for bf16 weights). Checkpoints are read directly
            in it, tensor by tensor: loading never allocates a second, full-precision copy.
        gradient_checkpointing: recompute transformer layers in backward.
        normalize_waveform: see :class:`Upstream`.
        seed: initialisation seed of the tiny models.
        local_files_only: never touch the network (hub ids resolve from the local cache only,
            which is all an offline machine can do). Set False where downloads are possible.
        progress: show transformers' progress bar while the weights load.

    Raises:
        UpstreamLoadError: the model cannot be found or loaded, or is not wav2vec2/HuBERT/WavLM.
    """
    from transformers import AutoConfig, AutoModel

    if name_or_path in TINY_UPSTREAMS:
        config = _tiny_config(name_or_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(config)
        return _finish(model, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                       name=name_or_path, normalize_waveform=normalize_waveform)
    if name_or_path in EMBEDDED_UPSTREAMS:
        folder = str(embedded_upstream_dir(name_or_path))
        model = _load_pretrained(folder, AutoConfig.from_pretrained(folder, local_files_only=True), dtype, True, progress)
        return _finish(model, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                       name=name_or_path, normalize_waveform=normalize_waveform)
    if name_or_path.startswith("tiny-"):
        raise UpstreamLoadError(f"unknown tiny upstream {name_or_path!r}; known: {', '.join(TINY_UPSTREAMS)}")
    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    offline = (" Nothing is downloaded (local_files_only=True); in an offline environment pass a directory "
               "with config.json and the weights, a hub id that is already cached, or one of "
               + ", ".join(TINY_UPSTREAMS) + ".")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except Exception as exc:
        where = "local directory" if local.exists() else "hub id"
        raise UpstreamLoadError(f"cannot load upstream {name_or_path!r} as a {where}: {exc}.{offline}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UpstreamLoadError(
            f"upstream {name_or_path!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _disable_training_noise(config)
    try:
        model = _load_pretrained(source, config, dtype, local_files_only, progress)
    except Exception as exc:
        raise UpstreamLoadError(f"cannot load the weights of upstream {name_or_path!r}: {exc}.{offline}") from exc
    return _finish(model, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                   name=name_or_path, normalize_waveform=normalize_waveform)
