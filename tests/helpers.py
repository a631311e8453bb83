"""Small models shared by the core tests (built in code; nothing is downloaded)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    """Linear -> tanh -> LayerNorm -> Linear classifier; a sample is one row."""

    def __init__(self, d_in=7, d_hidden=13, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, classes)

    def forward(self, x):
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def tiny_wav2vec2_config(**overrides):
    from transformers import Wav2Vec2Config

    config = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
        feat_extract_norm="layer", do_stable_layer_norm=False, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.0, layerdrop=0.0,
        hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1,
    )
    config.update(overrides)
    return Wav2Vec2Config(**config)


class TinyWav2Vec2Classifier(nn.Module):
    """A tiny random wav2vec2 upstream + masked mean pooling + linear head."""

    def __init__(self, classes=4, **config_overrides):
        super().__init__()
        from transformers import Wav2Vec2Model

        self.upstream = Wav2Vec2Model(tiny_wav2vec2_config(**config_overrides))
        self.head = nn.Linear(self.upstream.config.hidden_size, classes)

    def default_scored_parameters(self):
        return [n for n, _ in self.named_parameters() if ".encoder.layers." in f".{n}"]

    def forward(self, wav, wav_lengths, on_frame_lengths=None):
        mask = (torch.arange(wav.shape[1])[None, :] < wav_lengths[:, None]).long()
        frames = self.upstream._get_feat_extract_output_lengths(wav_lengths)
        if on_frame_lengths is not None:
            on_frame_lengths(frames)
        hidden = self.upstream(wav, attention_mask=mask).last_hidden_state
        valid = (torch.arange(hidden.shape[1])[None, :] < frames[:, None]).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * valid).sum(1) / frames[:, None].to(hidden.dtype)
        return self.head(pooled)


def wav_loss(model, batch, fisher_pass=None):
    """Per-sample cross-entropy; reports the frame lengths to the Fisher pass it is handed."""
    wav, lengths, labels = batch
    report = None if fisher_pass is None else fisher_pass.note_sample_lengths
    return F.cross_entropy(model(wav, lengths, report), labels, reduction="none")


def padded_wav_batches(lengths, classes=4, seed=0, batch_size=None):
    """Random waveforms of the given lengths, zero-padded into batches of ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    waves = [torch.randn(n, generator=gen) for n in lengths]
    labels = torch.randint(0, classes, (len(lengths),), generator=gen)
    batch_size = batch_size or len(lengths)
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = waves[start:start + batch_size]
        longest = max(w.numel() for w in chunk)
        wav = torch.zeros(len(chunk), longest)
        for i, w in enumerate(chunk):
            wav[i, : w.numel()] = w
        batches.append((wav, torch.tensor([w.numel() for w in chunk]), labels[start:start + batch_size]))
    return batches
