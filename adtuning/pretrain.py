"""``python -m adtuning.pretrain``: the recipe that builds the embedded upstreams.

HuBERT pre-training on CPU, deterministic from a seed, resumable:

1. **corpus** — English phrases synthesised with espeak-ng, ``--corpus v1``
   (:func:`adtuning.speech.pretraining_corpus.generate_pretraining_corpus`: 501 words, 14
   variants) or ``--corpus v2`` (:func:`~adtuning.speech.pretraining_corpus.generate_pretraining_corpus_v2`:
   about 10,000 words, every usable English voice and variant but the held-out ones, wide
   rate / pitch / range). Speakers are disjoint from every downstream corpus's; cached.
2. **iteration 1 targets** — 39-dimensional MFCC frames (13 + deltas + delta-deltas, 25 ms
   windows, one frame per 320 samples: exactly the CNN's frames), standardised, clustered by
   k-means (k-means++ initialisation, a fixed number of Lloyd iterations, written in torch);
   each frame's cluster id is its target.
3. **masked prediction** — a ``transformers.HubertModel`` reads random crops (``--augment``:
   degraded on the fly by :class:`adtuning.speech.augment.PretrainingAugmenter`; the targets
   stay those of the clean audio); spans of frames chosen by transformers'
   ``_compute_mask_indices`` are replaced by the learned mask embedding, and a linear
   classifier on the last hidden state predicts the targets of the masked frames
   (cross-entropy). The masked-prediction accuracy on held-out speakers is logged.
4. **iteration 2** (``--iteration2-steps`` > 0) — the iteration-1 model's layer
   ``--iteration2-layer`` (the residual stream after that transformer layer) is computed on
   the clean training utterances, standardised and clustered (``--iteration2-clusters``); the
   model continues from its iteration-1 weights with a new classifier on these targets.
5. **save** — ``save_pretrained`` (``config.json`` + ``model.safetensors``, in
   ``--save-dtype``), loadable by :func:`adtuning.speech.build_upstream` like any hub model,
   plus ``pretraining.json`` (command, seed, CPU-hours, corpus, held-out accuracy per
   iteration, loss curves, versions).

With ``--state-dir`` the run is resumable: the same command continues from the newest
checkpoint (``checkpoint.safetensors``: model, classifier and AdamW state as tensors, progress
as JSON metadata; written atomically every ``--checkpoint-minutes`` and at each evaluation).
Every step draws its batch, crops, masks, dropout and augmentation from generators seeded by
(seed, iteration, step), so a resumed run computes what an uninterrupted one does.
``--export-only`` writes the newest checkpoint's model to ``--output-dir`` without training.

The shipped upstreams were made by::

    python -m adtuning.pretrain --output-dir adtuning/speech/assets/adtuning-hubert-mini --threads 1
    # adtuning-hubert-small: the command in its pretraining.json
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adtuning.atomic import atomic_write
from adtuning.cli_format import DefaultsOnceHelpFormatter
from adtuning.pretrain_state import (
    checkpoint_progress,
    load_checkpoint,
    load_iteration1,
    load_tensors,
    save_checkpoint,
    save_tensors,
    split_targets,
    step_seed,
)

log = logging.getLogger("adtuning")

CONV_DIM = (32, 64, 64, 128, 128, 128, 128)  # light CNN: it dominates the step time on CPU
FRAME_STRIDE = 320  # samples per CNN frame (50 frames/s, as wav2vec2/HuBERT base)
RECEPTIVE_FIELD = 400  # samples seen by one CNN frame = one MFCC window of 25 ms


def mini_hubert_config(hidden_size: int = 128, layers: int = 4, heads: int = 4):
    """The embedded upstream's architecture: HuBERT with base's 7-layer CNN geometry (frame
    stride 320, receptive field 400) at 32-128 channels, layer-norm CNN, pre-LN transformer.

    About 1.04M parameters at the defaults (hidden 128, 4 layers, 512 feed-forward units).
    """
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden_size,
        conv_dim=CONV_DIM, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
        hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        # mask_time_prob > 0 only makes transformers create the mask embedding; the recipe
        # passes its own mask_time_indices.
        layerdrop=0.0, apply_spec_augment=True, mask_time_prob=0.05, mask_feature_prob=0.0, vocab_size=32,
    )


# ---------------------------------------------------------------------------------------------
# targets

def mfcc_frames(wav: torch.Tensor) -> torch.Tensor:
    """``[T, 39]`` MFCC + deltas + delta-deltas of one 16 kHz waveform; frame t covers samples
    ``[320 t, 320 t + 400)``, exactly like the CNN's frame t, so ``T`` equals its frame count."""
    import torchaudio

    if not hasattr(mfcc_frames, "_transform"):
        mfcc_frames._transform = torchaudio.transforms.MFCC(
            sample_rate=16000, n_mfcc=13, melkwargs={"n_fft": RECEPTIVE_FIELD, "hop_length": FRAME_STRIDE, "n_mels": 40, "center": False})
    m = mfcc_frames._transform(wav.float()[None])[0]  # [13, T]
    d1 = torchaudio.functional.compute_deltas(m[None])[0]
    d2 = torchaudio.functional.compute_deltas(d1[None])[0]
    return torch.cat([m, d1, d2]).T.contiguous()


def kmeans(x: torch.Tensor, k: int, *, iterations: int, seed: int, init_samples: int = 20000) -> torch.Tensor:
    """``[k, D]`` centroids of the rows of ``x`` by k-means: k-means++ seeding on a random
    subset of ``init_samples`` rows, then ``iterations`` Lloyd iterations over all rows
    (an empty cluster is re-seeded at the row farthest from its centroid)."""
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {x.shape[0]}")
    sub = x[torch.randperm(x.shape[0], generator=g)[:init_samples]]
    centroids = sub[torch.randint(sub.shape[0], (1,), generator=g)]
    d2 = torch.cdist(sub, centroids).squeeze(1).pow(2)
    for _ in range(1, k):
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centroids = torch.cat([centroids, sub[pick]])
        d2 = torch.minimum(d2, (sub - sub[pick]).pow(2).sum(1))
    for _ in range(iterations):
        dist, assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        for c in torch.nonzero(empty).flatten().tolist():
            far = int(dist.argmax())
            centroids[c] = x[far]
            dist[far] = 0
    return centroids


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    dists, assigns = [], []
    for part in x.split(chunk):
        d = torch.cdist(part, centroids)
        best = d.min(1)
        dists.append(best.values)
        assigns.append(best.indices)
    return torch.cat(dists), torch.cat(assigns)


# ---------------------------------------------------------------------------------------------
# data

class Utterances:
    """The waveforms (int16) and frame targets of one split, held in memory."""

    def __init__(self, wavs: list[torch.Tensor], targets: list[torch.Tensor]):
        self.wavs, self.targets = wavs, targets

    def __len__(self) -> int:
        return len(self.wavs)

    def batch(self, indices: Sequence[int], crop_frames: int, generator: torch.Generator, augment=None, key: tuple = ()):
        """A padded batch of random crops of at most ``crop_frames`` frames, cut at frame
        boundaries so that the targets stay aligned: (wav [B, L], wav_lengths, targets [B, T], frame_lengths).

        ``augment(wav, *key, b)`` (an :class:`~adtuning.speech.augment.PretrainingAugmenter`)
        degrades crop ``b``; when it changes the length (speed perturbation) the targets are
        warped onto the new frames (:func:`~adtuning.speech.augment.warp_targets`)."""
        wavs, targets = [], []
        for b, i in enumerate(indices):
            t = self.targets[i]
            start = int(torch.randint(max(1, len(t) - crop_frames + 1), (1,), generator=generator))
            n = min(crop_frames, len(t) - start)
            t = t[start:start + n]
            w = self.wavs[i][start * FRAME_STRIDE: start * FRAME_STRIDE + (n - 1) * FRAME_STRIDE + RECEPTIVE_FIELD].float() / 32768.0
            if augment is not None:
                from adtuning.speech.augment import warp_targets

                w = torch.from_numpy(augment(w.numpy(), *key, b))
                frames = max(1, (len(w) - RECEPTIVE_FIELD) // FRAME_STRIDE + 1)
                w = F.pad(w, (0, max(0, (frames - 1) * FRAME_STRIDE + RECEPTIVE_FIELD - len(w))))
                if frames != len(t):
                    t = warp_targets(t, frames)
            targets.append(t)
            wavs.append(w)
        wav_lengths = torch.tensor([len(w) for w in wavs])
        frame_lengths = torch.tensor([len(t) for t in targets])
        wav = torch.zeros(len(wavs), int(wav_lengths.max()))
        tgt = torch.full((len(wavs), int(frame_lengths.max())), -100, dtype=torch.long)
        for b, (w, t) in enumerate(zip(wavs, targets)):
            wav[b, :len(w)] = w
            tgt[b, :len(t)] = t
        return wav, wav_lengths, tgt, frame_lengths


def load_split(items):
    """Read ``[(wav_path, text)]``; returns (int16 waveforms, MFCC frames per utterance)."""
    import soundfile as sf

    wavs, feats = [], []
    for path, _ in items:
        audio, rate = sf.read(str(path), dtype="int16")
        if rate != 16000 or audio.ndim != 1 or len(audio) < RECEPTIVE_FIELD:
            raise ValueError(f"{path}: expected 16 kHz mono audio of at least {RECEPTIVE_FIELD} samples")
        w = torch.from_numpy(audio.copy())
        wavs.append(w)
        feats.append(mfcc_frames(w.float() / 32768.0))
    return wavs, feats


# ---------------------------------------------------------------------------------------------
# model

class MaskedPredictor(nn.Module):
    """A HubertModel plus the linear classifier over k-means targets (discarded after pre-training)."""

    def __init__(self, config, num_targets: int):
        super().__init__()
        from transformers import HubertModel

        self.hubert = HubertModel(config)
        self.classifier = nn.Linear(config.hidden_size, num_targets)

    def forward(self, wav, wav_lengths, mask_time_indices):
        from adtuning.speech.upstream import prepare_waveforms

        wav, mask = prepare_waveforms(wav, wav_lengths, normalize=True)  # as Upstream does for layer-norm CNNs
        out = self.hubert(wav, attention_mask=mask.long(), mask_time_indices=mask_time_indices)
        return self.classifier(out.last_hidden_state)


def layer_features(hubert, wav: torch.Tensor, layer: int) -> torch.Tensor:
    """``[T, hidden]`` residual stream after transformer layer ``layer`` (1-based) of ``hubert``
    for one 16 kHz waveform ``wav`` (float, [L]), in eval mode, without masking; equal to
    ``hidden_states[layer]`` of ``output_hidden_states`` for ``layer`` < the number of layers."""
    from adtuning.speech.upstream import prepare_waveforms

    layers = hubert.encoder.layers
    if not 1 <= layer <= len(layers):
        raise ValueError(f"layer must be in [1, {len(layers)}], got {layer}")
    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        x, mask = prepare_waveforms(wav[None].float(), torch.tensor([len(wav)]), normalize=True)
        hubert(x, attention_mask=mask.long())
    finally:
        handle.remove()
    return captured[0][0]


def span_masks(frame_lengths: torch.Tensor, mask_prob: float, mask_length: int, seed: int) -> torch.Tensor:
    """``[B, T]`` bool masks from transformers' ``_compute_mask_indices`` (spans of
    ``mask_length`` frames, padding never masked), made deterministic by seeding the numpy
    global RNG it uses (restored afterwards)."""
    from transformers.models.hubert.modeling_hubert import _compute_mask_indices

    T = int(frame_lengths.max())
    attention = (torch.arange(T)[None] < frame_lengths[:, None]).long()
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        m = _compute_mask_indices((len(frame_lengths), T), mask_prob, mask_length, attention_mask=attention, min_masks=2)
    finally:
        np.random.set_state(state)
    return torch.from_numpy(m) & attention.bool()


def masked_accuracy(model: MaskedPredictor, data: Utterances, *, batch_size: int, crop_frames: int, mask_prob: float,
                    mask_length: int, seed: int) -> tuple[float, float]:
    """(loss, accuracy) of masked prediction on ``data`` with fixed crops and masks."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            wav, wav_lengths, tgt, frame_lengths = data.batch(idx, crop_frames, g)
            masks = span_masks(frame_lengths, mask_prob, mask_length, seed + start)
            logits = model(wav, wav_lengths, masks)
            sel = masks & (tgt >= 0)
            loss_sum += float(F.cross_entropy(logits[sel], tgt[sel], reduction="sum"))
            correct += int((logits[sel].argmax(-1) == tgt[sel]).sum())
            total += int(sel.sum())
    model.train()
    return loss_sum / max(total, 1), correct / max(total, 1)


# ---------------------------------------------------------------------------------------------
# resumable state

_RUN_FLAGS_IGNORED = ("output_dir", "threads", "no_progress", "export_only", "checkpoint_minutes", "save_dtype", "stop_after")


def iteration2_targets(hubert, train_wavs, held_wavs, *, layer: int, clusters: int, iterations: int, seed: int,
                       max_frames: int = 250_000, progress: bool = False):
    """Targets of HuBERT iteration 2: k-means (``clusters``) of the standardised
    :func:`layer_features` of the iteration-1 model at ``layer``, fitted on at most
    ``max_frames`` frames sampled from the training utterances (seeded); returns
    (train targets, held-out targets, centroids, feature mean, feature std)."""
    from tqdm.auto import tqdm

    hubert.eval()
    total = sum((len(w) - RECEPTIVE_FIELD) // FRAME_STRIDE + 1 for w in train_wavs)
    keep = min(1.0, max_frames / max(1, total))
    g = torch.Generator().manual_seed(step_seed("iteration2-frames", seed))
    sample = []
    with torch.no_grad():
        for w in tqdm(train_wavs, desc=f"layer-{layer} features", disable=not progress):
            f = layer_features(hubert, w.float() / 32768.0, layer)
            sample.append(f[torch.rand(len(f), generator=g) < keep])
        x = torch.cat(sample)
        del sample
        mean, std = x.mean(0), x.std(0).clamp(min=1e-5)
        centroids = kmeans((x - mean) / std, clusters, iterations=iterations, seed=seed + 2)
        del x

        def assign(wavs):
            return [_nearest((layer_features(hubert, w.float() / 32768.0, layer) - mean) / std, centroids)[1]
                    for w in tqdm(wavs, desc="iteration-2 targets", disable=not progress)]

        return assign(train_wavs), assign(held_wavs), centroids, mean, std


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adtuning.pretrain",
        description="Pre-train an embedded upstream: HuBERT-style masked prediction of k-means targets (iteration 1: MFCC; "
        "iteration 2: an intermediate layer of the iteration-1 model) on a generated espeak-ng corpus, on CPU, "
        "deterministic from --seed, resumable with --state-dir.",
        formatter_class=DefaultsOnceHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="where config.json, model.safetensors and pretraining.json go")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="resumable run folder (corpus, targets, checkpoints); the same command continues a killed run")
    parser.add_argument("--corpus", choices=("v1", "v2"), default="v1", help="pre-training corpus generator")
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="pre-training corpus folder (default: STATE_DIR/corpus, else under the adtuning corpus cache)")
    parser.add_argument("--speakers", type=int, default=64, help="synthetic pre-training speakers")
    parser.add_argument("--sentences-per-speaker", type=int, default=80, help="sentences per speaker")
    parser.add_argument("--held-out-speakers", type=int, default=4, help="speakers kept out of training for the masked accuracy")
    parser.add_argument("--max-seconds", type=float, default=2.5, help="longest utterance of the corpus")
    parser.add_argument("--clusters", type=int, default=100, help="k-means clusters (prediction targets) of iteration 1")
    parser.add_argument("--kmeans-iterations", type=int, default=25, help="Lloyd iterations")
    parser.add_argument("--hidden-size", type=int, default=128, help="transformer width")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps of iteration 1")
    parser.add_argument("--iteration2-steps", type=int, default=0, help="optimizer steps of iteration 2 (0: iteration 1 only)")
    parser.add_argument("--iteration2-layer", type=int, default=None,
                        help="transformer layer of the iteration-1 model whose k-means gives the iteration-2 targets "
                             "(default: two thirds of --layers)")
    parser.add_argument("--iteration2-clusters", type=int, default=200, help="k-means clusters of iteration 2")
    parser.add_argument("--iteration1-from", type=Path, default=None,
                        help="an upstream this recipe exported at the end of iteration 1 (its pretraining.json must record the "
                             "same corpus, model and iteration-1 arguments): start iteration 2 from its weights instead of "
                             "training iteration 1 (for a run whose state folder was lost)")
    parser.add_argument("--batch-size", type=int, default=24, help="crops per step")
    parser.add_argument("--crop-seconds", type=float, default=1.5, help="longest crop")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (linear warm-up, then linear decay; per iteration)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--mask-prob", type=float, default=0.5, help="mask_prob of _compute_mask_indices (about this fraction of frames is masked)")
    parser.add_argument("--mask-length", type=int, default=5, help="masked span length in frames")
    parser.add_argument("--augment", type=float, default=0.0,
                        help="scale of the on-the-fly augmentation probabilities (0: none, 1: adtuning.speech.augment's)")
    parser.add_argument("--rooms", type=int, default=64, help="simulated rooms (impulse responses) of the augmentation")
    parser.add_argument("--augment-colour", action="store_true", help="add spectral-colour degradations (EQ, distortion, "
                        "bit crushing) to --augment (adtuning.speech.augment)")
    parser.add_argument("--finetune-dropout", type=float, default=0.0,
                        help="dropout written into the shipped config (pre-training uses 0.1): a 1M-parameter model fine-tuned for a few "
                             "hundred steps learns faster without it")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the shipped weights")
    parser.add_argument("--eval-interval", type=int, default=200, help="held-out evaluation (and checkpoint) every N steps")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0, help="with --state-dir: checkpoint at least this often")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="with --state-dir: stop, checkpointed, after this many steps of this invocation (0: run to the end); "
                             "the same command resumes")
    parser.add_argument("--export-only", action="store_true", help="write the newest checkpoint's model to --output-dir and stop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus, k-means, initialisation, crops, masks and augmentation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_args(args) -> str | None:
    for flag in ("steps", "batch_size", "clusters", "layers", "heads", "hidden_size", "iteration2_clusters", "eval_interval"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
    if args.hidden_size % args.heads or args.hidden_size % 16:
        return f"--hidden-size {args.hidden_size} must be a multiple of --heads and of 16"
    if args.iteration1_from is not None and args.iteration2_steps == 0:
        return "--iteration1-from needs --iteration2-steps > 0"
    if args.iteration2_steps < 0:
        return f"--iteration2-steps must be >= 0, got {args.iteration2_steps}"
    if args.iteration2_layer is not None and not 1 <= args.iteration2_layer <= args.layers:
        return f"--iteration2-layer must be in [1, --layers={args.layers}], got {args.iteration2_layer}"
    if not 0.0 <= args.augment <= 1.0:
        return f"--augment must be in [0, 1], got {args.augment}"
    if args.augment_colour and args.augment == 0:
        return "--augment-colour needs --augment > 0"
    if (args.export_only or args.stop_after) and args.state_dir is None:
        return "--export-only and --stop-after need --state-dir"
    if args.stop_after < 0:
        return f"--stop-after must be >= 0, got {args.stop_after}"
    return None


def _corpus(args, corpus_dir: Path):
    from adtuning.speech import pretraining_corpus as pc

    kw = dict(speakers=args.speakers, sentences_per_speaker=args.sentences_per_speaker, held_out_speakers=args.held_out_speakers,
              seed=args.seed, progress=not args.no_progress)
    if args.corpus == "v2":
        pc.generate_pretraining_corpus_v2(corpus_dir, max_seconds=args.max_seconds, **kw)
    else:
        pc.generate_pretraining_corpus(corpus_dir, max_seconds=args.max_seconds, **kw)
    return pc.read_pretraining_corpus(corpus_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the recipe; returns the exit code (0 ok, 2 bad arguments or a state
    folder made with other arguments)."""
    from adtuning.embedded import DEFAULT_CORPUS_CACHE

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started, cpu_started = time.time(), time.process_time()
    layer2 = args.iteration2_layer or max(1, round(2 * args.layers / 3))
    state = args.state_dir
    run = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _RUN_FLAGS_IGNORED}
    run["iteration2_layer"] = layer2
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        run_file = state / "run.json"
        if run_file.is_file():
            before = json.loads(run_file.read_text())
            before = {k: before.get(k, parser.get_default(k)) for k in run} | before  # a flag added since: its default
            changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
            if changed:
                print(f"error: {state} was made with other arguments ({', '.join('--' + k.replace('_', '-') for k in changed)}); "
                      "resume with the same command or choose another --state-dir", file=sys.stderr)
                return 2
        else:
            atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1, sort_keys=True) + "\n"))
    corpus_dir = args.corpus_dir or (state / "corpus" if state is not None else
                                     DEFAULT_CORPUS_CACHE / f"pretraining_sentences_seed{args.seed}")
    ckpt = state / "checkpoint.safetensors" if state is not None else None

    config = mini_hubert_config(args.hidden_size, args.layers, args.heads)
    if args.export_only:
        if not ckpt.is_file():
            print(f"error: {ckpt} does not exist: nothing to export", file=sys.stderr)
            return 2
        progress = checkpoint_progress(ckpt)
        clusters = args.clusters if progress["iteration"] == 1 else args.iteration2_clusters
        model = MaskedPredictor(config, clusters)
        load_checkpoint(ckpt, model, _optimizer(model, args))
        _export(args, argv, model, progress, corpus_dir)
        return 0

    items = _corpus(args, corpus_dir)
    train_wavs, train_feats = load_split(items["train"])
    held_wavs, held_feats = load_split(items["held_out"])
    hours = sum(len(w) for w in train_wavs) / 16000 / 3600
    log.info("corpus: %d train / %d held-out utterances (%.2f h) from %s", len(train_wavs), len(held_wavs), hours, corpus_dir)
    augment = None
    if args.augment > 0:
        from adtuning.speech.augment import PretrainingAugmenter, simulate_rooms

        rooms = simulate_rooms((state or corpus_dir.parent) / f"rooms_seed{args.seed}", args.rooms, args.seed)
        augment = PretrainingAugmenter([p for p, _ in items["train"]], rooms, seed=args.seed, p=args.augment,
                                       colour=args.augment_colour)

    progress = {"iteration": 1, "step": 0, "curves": {"1": [], "2": []}, "train_loss": [], "cpu_seconds": 0.0, "wall_seconds": 0.0}
    torch.manual_seed(args.seed)
    model = MaskedPredictor(config, args.clusters)
    opt = _optimizer(model, args)
    if ckpt is not None and ckpt.is_file():
        if checkpoint_progress(ckpt)["iteration"] == 2:
            model = MaskedPredictor(config, args.iteration2_clusters)
            opt = _optimizer(model, args)
        progress = load_checkpoint(ckpt, model, opt)
        log.info("resumed %s: iteration %d, step %d", ckpt, progress["iteration"], progress["step"])
    elif args.iteration1_from is not None:
        try:
            source = load_iteration1(args.iteration1_from, model.hubert, run)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # The totals include the iteration that made the source (its CPU-hours and curve).
        progress.update(step=args.steps, cpu_seconds=3600 * source["cpu_hours"], wall_seconds=source["wall_seconds"],
                        curves={"1": source.pop("curve"), "2": []}, iteration1_from=source)
        log.info("iteration 1 from %s (held-out accuracy %s): iteration 2 starts from it", args.iteration1_from,
                 source["held_out_masked_accuracy"])
    clock = {"cpu": cpu_started - progress["cpu_seconds"], "wall": started - progress["wall_seconds"], "steps": 0}

    # iteration 1 targets
    it1 = state / "targets_iteration1.safetensors" if state is not None else None
    if it1 is not None and it1.is_file():
        t = load_tensors(it1)
        mean, std, centroids = t["mean"], t["std"], t["centroids"]
    else:
        frames = torch.cat(train_feats)
        mean, std = frames.mean(0), frames.std(0).clamp(min=1e-5)
        t0 = time.perf_counter()
        centroids = kmeans((frames - mean) / std, args.clusters, iterations=args.kmeans_iterations, seed=args.seed)
        del frames
        log.info("k-means (MFCC): %d clusters in %.1fs", args.clusters, time.perf_counter() - t0)
        if it1 is not None:
            save_tensors(it1, {"mean": mean, "std": std, "centroids": centroids})
    train = Utterances(train_wavs, [_nearest((f - mean) / std, centroids)[1] for f in train_feats])
    held = Utterances(held_wavs, [_nearest((f - mean) / std, centroids)[1] for f in held_feats])
    del train_feats, held_feats
    usage = torch.bincount(torch.cat(train.targets), minlength=args.clusters)
    log.info("iteration-1 targets: largest cluster %.1f%% of %d frames", 100.0 * float(usage.max()) / float(usage.sum()), int(usage.sum()))
    log.info("model: HubertModel, %s parameters (hidden %d, %d layers), %d threads",
             f"{sum(p.numel() for p in model.hubert.parameters()):,}", args.hidden_size, args.layers, torch.get_num_threads())

    if progress["iteration"] == 1:
        if not _train_iteration(args, 1, args.steps, model, opt, train, held, augment, progress, ckpt, clock):
            return 0
        if args.iteration2_steps > 0:
            if state is not None:
                save_tensors(state / "iteration1_model.safetensors", {k: v for k, v in model.state_dict().items()})
    if args.iteration2_steps > 0:
        it2 = state / "targets_iteration2.safetensors" if state is not None else None
        lengths = [len(t) for t in train.targets], [len(t) for t in held.targets]
        if it2 is not None and it2.is_file():
            t = load_tensors(it2)
            train.targets, held.targets = split_targets(t["train"], lengths[0]), split_targets(t["held_out"], lengths[1])
        else:
            teacher = MaskedPredictor(config, args.clusters)
            if state is not None and progress["iteration"] == 2:  # killed between the targets and their file
                teacher.load_state_dict(load_tensors(state / "iteration1_model.safetensors"))
            else:
                teacher.load_state_dict(model.state_dict())
            t0 = time.perf_counter()
            tr, ho, c2, m2, s2 = iteration2_targets(teacher.hubert, train.wavs, held.wavs, layer=layer2, clusters=args.iteration2_clusters,
                                                    iterations=args.kmeans_iterations, seed=args.seed, progress=not args.no_progress)
            log.info("iteration-2 targets: k-means of layer %d, %d clusters, in %.1fs", layer2, args.iteration2_clusters, time.perf_counter() - t0)
            train.targets, held.targets = tr, ho
            if it2 is not None:
                save_tensors(it2, {"train": torch.cat(tr), "held_out": torch.cat(ho), "centroids": c2, "mean": m2, "std": s2},
                              {"layer": layer2})
            del teacher
        if progress["iteration"] == 1:
            # warm start: the iteration-1 transformer and CNN, a new classifier and optimizer
            torch.manual_seed(step_seed("iteration2-init", args.seed))
            new = MaskedPredictor(config, args.iteration2_clusters)
            new.hubert.load_state_dict(model.hubert.state_dict())
            model, opt = new, _optimizer(new, args)
            progress.update(iteration=2, step=0, train_loss=[])
        if not _train_iteration(args, 2, args.iteration2_steps, model, opt, train, held, augment, progress, ckpt, clock):
            return 0
    _export(args, argv, model, progress, corpus_dir, train_utterances=len(train), held_utterances=len(held), hours=hours)
    return 0


def _optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def _train_iteration(args, iteration: int, steps: int, model: MaskedPredictor, opt, train: Utterances, held: Utterances,
                     augment, progress: dict, ckpt: Path | None, clock: dict) -> bool:
    """Steps ``progress["step"]`` .. ``steps`` of one iteration; checkpoints into ``ckpt``.
    Returns False when ``--stop-after`` stopped it first (checkpointed)."""
    from tqdm.auto import tqdm

    warm = max(1, args.warmup_steps)
    crop = max(1, int(args.crop_seconds * 16000) // FRAME_STRIDE)
    eval_kw = dict(batch_size=64, crop_frames=crop, mask_prob=args.mask_prob, mask_length=args.mask_length, seed=args.seed + 7)
    curve = progress["curves"][str(iteration)]
    last_save = time.time()

    def checkpoint():
        progress.update(cpu_seconds=time.process_time() - clock["cpu"], wall_seconds=time.time() - clock["wall"])
        if ckpt is not None:
            save_checkpoint(ckpt, model, opt, progress)

    model.train()
    bar = tqdm(range(progress["step"], steps), desc=f"pre-training, iteration {iteration}", unit="step", disable=args.no_progress)
    for step in bar:
        if args.stop_after and clock["steps"] >= args.stop_after:
            bar.close()
            checkpoint()
            log.info("stopped after %d steps (--stop-after), at iteration %d step %d; the same command resumes",
                     clock["steps"], iteration, step)
            return False
        clock["steps"] += 1
        g = torch.Generator().manual_seed(step_seed("batch", args.seed, iteration, step))
        torch.manual_seed(step_seed("dropout", args.seed, iteration, step))
        idx = torch.randint(len(train), (args.batch_size,), generator=g).tolist()
        wav, wav_lengths, tgt, frame_lengths = train.batch(idx, crop, g, augment, (iteration, step))
        masks = span_masks(frame_lengths, args.mask_prob, args.mask_length, step_seed("masks", args.seed, iteration, step))
        for group in opt.param_groups:
            group["lr"] = args.lr * min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))
        logits = model(wav, wav_lengths, masks)
        sel = masks & (tgt >= 0)
        loss = F.cross_entropy(logits[sel], tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        progress["step"] = step + 1
        progress["train_loss"] = (progress["train_loss"] + [float(loss.detach())])[-50:]
        bar.set_postfix(loss=f"{progress['train_loss'][-1]:.3f}")
        if (step + 1) % args.eval_interval == 0 or step + 1 == steps:
            held_loss, held_acc = masked_accuracy(model, held, **eval_kw)
            curve.append({"step": step + 1, "held_out_loss": held_loss, "held_out_masked_accuracy": held_acc,
                          "train_loss": float(np.mean(progress["train_loss"]))})
            log.info("iteration %d, step %d: train loss %.3f, held-out masked loss %.3f, accuracy %.4f (uniform %.4f)", iteration,
                     step + 1, curve[-1]["train_loss"], held_loss, held_acc, 1.0 / logits.shape[-1])
            checkpoint()
            last_save = time.time()
        elif ckpt is not None and time.time() - last_save >= 60 * args.checkpoint_minutes:
            checkpoint()
            last_save = time.time()
    bar.close()
    checkpoint()
    return True


def _export(args, argv, model: MaskedPredictor, progress: dict, corpus_dir: Path, **corpus) -> None:
    """Save the transformer as a plain feature extractor (no mask embedding, no SpecAugment)
    into ``--output-dir`` with ``pretraining.json``."""
    import copy

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    hubert = copy.deepcopy(model.hubert)
    del hubert.masked_spec_embed
    hubert.config.apply_spec_augment = False
    hubert.config.mask_time_prob = 0.0
    hubert.config.hidden_dropout = hubert.config.attention_dropout = args.finetune_dropout
    n_params = sum(p.numel() for p in hubert.parameters())
    hubert.to(getattr(torch, args.save_dtype)).save_pretrained(str(out), safe_serialization=True)
    done = progress["iteration"] == (2 if args.iteration2_steps else 1) and progress["step"] == (
        args.iteration2_steps if progress["iteration"] == 2 else args.steps)
    curves = {k: v for k, v in progress["curves"].items() if v}
    final = curves[max(curves)][-1]["held_out_masked_accuracy"] if curves else None
    command = ["python", "-m", "adtuning.pretrain", *argv]
    if args.export_only:
        command = [c for c in command if c != "--export-only"]
    meta = {}
    manifest = corpus_dir / "adtuning_synth.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        voices = sorted({s[0] for s in m["params"]["speakers"]})
        meta = {"generator": m["generator"], "version": m["version"], "espeak_version": m.get("espeak_version"),
                "utterances": m.get("utterances"), "speakers": len(m["params"]["speakers"]), "voices": len(voices),
                "vocabulary_size": m["params"]["vocabulary_size"]}
    if args.corpus == "v2":
        from adtuning.speech.speakers import HELD_OUT_LANGUAGES, HELD_OUT_VARIANTS

        meta.update(held_out_languages=list(HELD_OUT_LANGUAGES), held_out_variants=list(HELD_OUT_VARIANTS))
    record = {
        "command": shlex.join(command), "complete": done, "iteration": progress["iteration"], "step": progress["step"],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed, "cpu_hours": round(progress["cpu_seconds"] / 3600, 3), "wall_seconds": round(progress["wall_seconds"], 1),
        "threads": torch.get_num_threads(), "parameters": n_params, "dtype": args.save_dtype,
        "corpus": dict(meta, held_out_speakers=args.held_out_speakers, **corpus),
        "targets": {"1": {"features": "MFCC 13 + deltas + delta-deltas, standardised", "clusters": args.clusters},
                    "2": ({"features": f"layer {args.iteration2_layer or max(1, round(2 * args.layers / 3))} of the iteration-1 model, "
                                       "standardised", "clusters": args.iteration2_clusters} if args.iteration2_steps else None)},
        "iteration1_from": progress.get("iteration1_from"),
        "kmeans_iterations": args.kmeans_iterations, "augment": args.augment,
        "final_held_out_masked_accuracy": final,
        "uniform_accuracy": 1.0 / (args.iteration2_clusters if progress["iteration"] == 2 else args.clusters), "curves": curves,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    atomic_write(out / "pretraining.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    log.info("saved %s (%s parameters, iteration %d step %d, held-out masked accuracy %s)", out, f"{n_params:,}",
             progress["iteration"], progress["step"], final)


if __name__ == "__main__":
    sys.exit(main())
