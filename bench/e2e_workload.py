"""The workload of the end-to-end benchmarks: one wav2vec2-base training step, full
fine-tuning or CHILD-TUNING. Shared by ``bench_e2e.py`` (CPU workers) and ``gpu_check.py``
(CUDA), and free of pytest so that the GPU script can import it on a bare machine."""
from __future__ import annotations

import torch


def build(config: dict):
    """Model, batch and optimizer of one e2e configuration, and a dict describing it.

    ``config`` keys: ``kind`` (``"full"`` or ``"child"``), ``dtype`` (``"fp32"``/``"bf16"``),
    ``device``, ``layers``, ``batch``, ``seconds``; for ``"child"`` also ``p``, ``backend`` and
    ``weight_grad`` (``"dense"`` when absent); optionally ``model_overrides`` (extra
    ``Wav2Vec2Config`` fields, e.g. a tiny width for dry runs).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from adtuning import BackendUnavailableError, ChildNetwork, SparseAdamW, install_sparse_weight_grad
    from adtuning.speech import SpeechModel, build_task
    from adtuning.speech.upstream import Upstream

    device = torch.device(config["device"])
    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32
    torch.manual_seed(0)
    model_config = Wav2Vec2Config(num_hidden_layers=config["layers"], **config.get("model_overrides", {}))
    upstream = Upstream(Wav2Vec2Model(model_config).to(device=device, dtype=dtype))
    task = build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers)
    model = SpeechModel(upstream, task.to(device)).to(device)
    model.train()

    gen = torch.Generator().manual_seed(1)
    samples = int(config["seconds"] * 16000)
    batch = {
        "wav": torch.randn(config["batch"], samples, generator=gen).to(device),
        "wav_lengths": torch.full((config["batch"],), samples, dtype=torch.long).to(device),
        "label": torch.randint(0, 12, (config["batch"],), generator=gen).to(device),
    }
    info = {"upstream_params": sum(p.numel() for p in upstream.parameters()), "dtype": config["dtype"]}
    if config["kind"] == "full":
        trainable = [p for p in model.parameters() if p.requires_grad]
        try:
            optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
            info["optimizer"] = "torch.optim.AdamW(fused=True)"
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
            info["optimizer"] = "torch.optim.AdamW(foreach=True)"
        info["trained_entries"] = sum(p.numel() for p in trainable)
    else:
        scored = upstream.default_scored_parameters()
        named = dict(upstream.named_parameters())
        score_gen = torch.Generator().manual_seed(2)
        scores = {n: torch.rand(named[n].shape, generator=score_gen) for n in scored}
        child = ChildNetwork.from_scores(scores, config["p"])
        del scores
        backend = config["backend"]
        try:
            optimizer = SparseAdamW(
                [{"named_params": upstream.named_parameters(), "child": child},
                 {"params": model.head_parameters(), "lr": 1e-3}],
                lr=1e-5, weight_decay=0.0, backend=backend,
            )
        except BackendUnavailableError as exc:
            # Recorded in the results, never silent: the reference update is slower.
            info["backend_note"] = f"{backend} unavailable ({str(exc).splitlines()[0]}); used reference"
            optimizer = SparseAdamW(
                [{"named_params": upstream.named_parameters(), "child": child},
                 {"params": model.head_parameters(), "lr": 1e-3}],
                lr=1e-5, weight_decay=0.0, backend="reference",
            )
        weight_grad = install_sparse_weight_grad(model, optimizer, config.get("weight_grad", "dense"))
        info.update(
            weight_grad=config.get("weight_grad", "dense"),
            sparse_dw_linears=len(weight_grad.sparse), dense_dw_linears=len(weight_grad.dense),
            optimizer=f"SparseAdamW(backend={optimizer.backend_name})",
            k=child.k, scored_entries=child.n,
            tensors_with_child=len(child.indices), scored_tensors=len(child.shapes),
            trained_entries=child.k + sum(p.numel() for p in model.head_parameters()),
        )
    return model, batch, optimizer, info
