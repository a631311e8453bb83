"""``python -m adtuning.pretrain``: the recipe that builds the embedded upstream.

HuBERT iteration 1 on CPU, deterministic from a seed:

1. **corpus** — short English sentences synthesised with espeak-ng by
   :func:`adtuning.speech.pretraining_corpus.generate_pretraining_corpus` (speakers disjoint
   from every downstream corpus; cached).
2. **targets** — 39-dimensional MFCC frames (13 + deltas + delta-deltas, 25 ms windows, one
   frame per 320 samples: exactly the CNN's frames), standardised, clustered by k-means
   (k-means++ initialisation, a fixed number of Lloyd iterations, written in torch); each
   frame's cluster id is its target.
3. **masked prediction** — a small ``transformers.HubertModel`` reads random crops; spans of
   frames chosen by transformers' ``_compute_mask_indices`` are replaced by the learned mask
   embedding, and a linear classifier on the last hidden state predicts the targets of the
   masked frames (cross-entropy). The masked-prediction accuracy on held-out speakers is logged.
4. **save** — ``save_pretrained`` (``config.json`` + ``model.safetensors``), loadable by
   :func:`adtuning.speech.build_upstream` like any hub model, plus ``pretraining.json``
   (command, seed, wall time, corpus size, held-out accuracy, loss curve, versions).

The shipped upstream ``adtuning-hubert-mini`` (``adtuning/speech/assets/``) was made by
``python -m adtuning.pretrain --output-dir adtuning/speech/assets/adtuning-hubert-mini``.
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

    def batch(self, indices: Sequence[int], crop_frames: int, generator: torch.Generator):
        """A padded batch of random crops of at most ``crop_frames`` frames, cut at frame
        boundaries so that the targets stay aligned: (wav [B, L], wav_lengths, targets [B, T], frame_lengths)."""
        wavs, targets = [], []
        for i in indices:
            t = self.targets[i]
            start = int(torch.randint(max(1, len(t) - crop_frames + 1), (1,), generator=generator))
            n = min(crop_frames, len(t) - start)
            targets.append(t[start:start + n])
            wavs.append(self.wavs[i][start * FRAME_STRIDE: start * FRAME_STRIDE + (n - 1) * FRAME_STRIDE + RECEPTIVE_FIELD])
        wav_lengths = torch.tensor([len(w) for w in wavs])
        frame_lengths = torch.tensor([len(t) for t in targets])
        wav = torch.zeros(len(wavs), int(wav_lengths.max()))
        tgt = torch.full((len(wavs), int(frame_lengths.max())), -100, dtype=torch.long)
        for b, (w, t) in enumerate(zip(wavs, targets)):
            wav[b, :len(w)] = w.float() / 32768.0
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
# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adtuning.pretrain",
        description="Pre-train the embedded upstream: HuBERT-style masked prediction of MFCC k-means targets on a "
        "generated espeak-ng corpus, on CPU, deterministic from --seed.",
        formatter_class=DefaultsOnceHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="where config.json, model.safetensors and pretraining.json go")
    parser.add_argument("--corpus-dir", type=Path, default=None, help="pre-training corpus folder (default: under the adtuning corpus cache)")
    parser.add_argument("--speakers", type=int, default=64, help="synthetic pre-training speakers")
    parser.add_argument("--sentences-per-speaker", type=int, default=80, help="sentences per speaker")
    parser.add_argument("--held-out-speakers", type=int, default=4, help="speakers kept out of training for the masked accuracy")
    parser.add_argument("--clusters", type=int, default=100, help="k-means clusters (prediction targets)")
    parser.add_argument("--kmeans-iterations", type=int, default=25, help="Lloyd iterations")
    parser.add_argument("--hidden-size", type=int, default=128, help="transformer width")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=24, help="crops per step")
    parser.add_argument("--crop-seconds", type=float, default=1.5, help="longest crop")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (linear warm-up, then linear decay)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--mask-prob", type=float, default=0.5, help="mask_prob of _compute_mask_indices (about this fraction of frames is masked)")
    parser.add_argument("--mask-length", type=int, default=5, help="masked span length in frames")
    parser.add_argument("--finetune-dropout", type=float, default=0.0,
                        help="dropout written into the shipped config (pre-training uses 0.1): a 1M-parameter model fine-tuned for a few "
                             "hundred steps learns faster without it")
    parser.add_argument("--eval-interval", type=int, default=200, help="held-out evaluation every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus, k-means, initialisation, crops and masks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns the exit code (0 ok, 2 bad arguments)."""
    from tqdm.auto import tqdm

    from adtuning.embedded import DEFAULT_CORPUS_CACHE
    from adtuning.speech.pretraining_corpus import generate_pretraining_corpus, read_pretraining_corpus

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for flag in ("steps", "batch_size", "clusters", "layers", "heads", "hidden_size"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    if args.hidden_size % args.heads or args.hidden_size % 16:
        print(f"error: --hidden-size {args.hidden_size} must be a multiple of --heads and of 16", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    torch.manual_seed(args.seed)

    corpus_dir = args.corpus_dir or DEFAULT_CORPUS_CACHE / f"pretraining_sentences_seed{args.seed}"
    generate_pretraining_corpus(corpus_dir, speakers=args.speakers, sentences_per_speaker=args.sentences_per_speaker,
                                held_out_speakers=args.held_out_speakers, seed=args.seed, progress=not args.no_progress)
    items = read_pretraining_corpus(corpus_dir)
    train_wavs, train_feats = load_split(items["train"])
    held_wavs, held_feats = load_split(items["held_out"])
    log.info("corpus: %d train / %d held-out utterances (%.2f h) from %s", len(train_wavs), len(held_wavs),
             sum(len(w) for w in train_wavs) / 16000 / 3600, corpus_dir)

    frames = torch.cat(train_feats)
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-5)
    t0 = time.perf_counter()
    centroids = kmeans((frames - mean) / std, args.clusters, iterations=args.kmeans_iterations, seed=args.seed)
    del frames

    def targets(feats):
        return [_nearest((f - mean) / std, centroids)[1] for f in feats]

    train = Utterances(train_wavs, targets(train_feats))
    held = Utterances(held_wavs, targets(held_feats))
    usage = torch.bincount(torch.cat(train.targets), minlength=args.clusters)
    log.info("k-means: %d clusters over %d frames in %.1fs (largest cluster %.1f%% of frames)", args.clusters,
             int(usage.sum()), time.perf_counter() - t0, 100.0 * float(usage.max()) / float(usage.sum()))

    config = mini_hubert_config(args.hidden_size, args.layers, args.heads)
    model = MaskedPredictor(config, args.clusters)
    n_params = sum(p.numel() for p in model.hubert.parameters())
    log.info("model: HubertModel, %s parameters (hidden %d, %d layers), %d threads", f"{n_params:,}", args.hidden_size,
             args.layers, torch.get_num_threads())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, args.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(1, args.steps - warm))))
    crop = max(1, int(args.crop_seconds * 16000) // FRAME_STRIDE)
    eval_kw = dict(batch_size=64, crop_frames=crop, mask_prob=args.mask_prob, mask_length=args.mask_length, seed=args.seed + 7)
    g = torch.Generator().manual_seed(args.seed + 1)
    curve, history = [], []
    model.train()
    bar = tqdm(range(args.steps), desc="pre-training", unit="step", disable=args.no_progress)
    for step in bar:
        idx = torch.randint(len(train), (args.batch_size,), generator=g).tolist()
        wav, wav_lengths, tgt, frame_lengths = train.batch(idx, crop, g)
        masks = span_masks(frame_lengths, args.mask_prob, args.mask_length, args.seed * 1_000_003 + step)
        logits = model(wav, wav_lengths, masks)
        sel = masks & (tgt >= 0)
        loss = F.cross_entropy(logits[sel], tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        acc = float((logits[sel].argmax(-1) == tgt[sel]).float().mean())
        history.append((step + 1, float(loss.detach()), acc))
        bar.set_postfix(loss=f"{history[-1][1]:.3f}", acc=f"{acc:.3f}")
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            held_loss, held_acc = masked_accuracy(model, held, **eval_kw)
            curve.append({"step": step + 1, "held_out_loss": held_loss, "held_out_masked_accuracy": held_acc,
                          "train_loss": float(np.mean([h[1] for h in history[-50:]]))})
            log.info("step %d: train loss %.3f, held-out masked loss %.3f, accuracy %.4f (uniform %.4f)", step + 1,
                     curve[-1]["train_loss"], held_loss, held_acc, 1.0 / args.clusters)
    bar.close()

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # Shipped as a plain feature extractor: no mask embedding, no in-model SpecAugment.
    del model.hubert.masked_spec_embed
    model.hubert.config.apply_spec_augment = False
    model.hubert.config.mask_time_prob = 0.0
    model.hubert.config.hidden_dropout = model.hubert.config.attention_dropout = args.finetune_dropout
    n_params = sum(p.numel() for p in model.hubert.parameters())
    model.hubert.save_pretrained(str(out), safe_serialization=True)
    record = {
        "command": "python -m adtuning.pretrain " + shlex.join(argv), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed, "wall_seconds": round(time.time() - started, 1), "threads": torch.get_num_threads(),
        "parameters": n_params, "corpus": {"train_utterances": len(train), "held_out_utterances": len(held),
                                             "train_hours": sum(len(w) for w in train_wavs) / 16000 / 3600,
                                             "speakers": args.speakers, "held_out_speakers": args.held_out_speakers,
                                             "generator": "adtuning.speech.pretraining_corpus"},
        "targets": {"features": "MFCC 13 + deltas + delta-deltas, standardised", "clusters": args.clusters,
                    "kmeans_iterations": args.kmeans_iterations},
        "final_held_out_masked_accuracy": curve[-1]["held_out_masked_accuracy"], "uniform_accuracy": 1.0 / args.clusters,
        "curve": curve, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    atomic_write(out / "pretraining.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    log.info("saved %s (%s parameters, held-out masked accuracy %.4f, %.0fs)", out, f"{n_params:,}",
             record["final_held_out_masked_accuracy"], record["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
