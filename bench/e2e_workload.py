"""The workload of the end-to-end benchmarks: one wav2vec2-base training step, full
fine-tuning or CHILD-TUNING. Shared by ``bench_e2e.py`` (CPU workers) and ``gpu_check.py``
(CUDA), and free of pytest so that the GPU script can import it on a bare machine."""
from __future__ import annotations

import torch


def _model(config: dict, dtype: torch.dtype = torch.float32):
    """The upstream and upstream + KS head of a configuration; the same weights on every call."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from adtuning.speech import SpeechModel, build_task
    from adtuning.speech.upstream import Upstream

    device = torch.device(config["device"])
    torch.manual_seed(0)
    model_config = Wav2Vec2Config(num_hidden_layers=config["layers"], **config.get("model_overrides", {}))
    upstream = Upstream(Wav2Vec2Model(model_config).to(device=device, dtype=dtype))
    task = build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers)
    return upstream, SpeechModel(upstream, task.to(device)).to(device)


def fisher_children(config: dict, ps, out_dir, samples: int = 32, corpus_root=None) -> dict[float, str]:
    """Children chosen by a per-sample Fisher pass, written to ``out_dir``; ``{p: path}``.

    The pass scores the fp32 model of ``config`` (the same weights ``build`` makes) on
    ``samples`` clips of the embedded KS corpus's training split (generated into the corpus
    cache when missing), with ``config["backend"]``'s in-backward kernels. Unlike random scores,
    which spread a child evenly over every tensor, Fisher scores concentrate it in some tensors
    and rows: the sparse weight-gradient path sees the densities of a real run.
    """
    from pathlib import Path

    from adtuning import ChildNetwork, estimate_fisher
    from adtuning.embedded import DEFAULT_CORPUS_CACHE, embedded_corpus
    from adtuning.speech import build_dataset, make_loader

    root = corpus_root or embedded_corpus("ks").generate(DEFAULT_CORPUS_CACHE, progress=False)
    upstream, model = _model(config)
    loader = make_loader(build_dataset("ks", root, "train"), 8, shuffle=True, seed=0)
    # The adapter hands the upstream's frame lengths to the pass: padding is skipped in backward.
    scores = estimate_fisher(model, loader, lambda m, b, fisher_pass: m.per_sample_nll(b, fisher_pass.note_sample_lengths),
                             params=[f"upstream.{n}" for n in upstream.default_scored_parameters()],
                             backend=config["backend"], max_samples=samples, progress=False)
    scores = {name[len("upstream."):]: value for name, value in scores.items()}  # the upstream's names
    del model, upstream
    paths = {}
    for p, child in zip(ps, ChildNetwork.nested(scores, ps)):
        child.extra["scored_on"] = f"{samples} clips of the embedded KS corpus (train)"
        # no dot in the stem: ChildNetwork.save would read ".001" as a suffix
        paths[p] = str(child.save(Path(out_dir) / f"fisher-child-p{p:g}".replace(".", "_")))
    return paths


def build(config: dict):
    """Model, batch and optimizer of one e2e configuration, and a dict describing it.

    ``config`` keys: ``kind`` (``"full"`` or ``"child"``), ``dtype`` (``"fp32"``/``"bf16"``),
    ``device``, ``layers``, ``batch``, ``seconds``; for ``"child"`` also ``p``, ``backend``,
    ``weight_grad`` (``"dense"`` when absent) and ``child_path`` (a child written by
    :func:`fisher_children`; absent: chosen from random scores); optionally ``model_overrides``
    (extra ``Wav2Vec2Config`` fields, e.g. a tiny width for dry runs).
    """
    from adtuning import BackendUnavailableError, ChildNetwork, SparseAdamW, install_sparse_weight_grad

    device = torch.device(config["device"])
    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32
    upstream, model = _model(config, dtype)
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
        if config.get("child_path"):
            child = ChildNetwork.load(config["child_path"], upstream.named_parameters())
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
            k=child.k, scored_entries=child.n, children="fisher" if config.get("child_path") else "random",
            tensors_with_child=len(child.indices), scored_tensors=len(child.shapes),
            rows_with_child=sum(int(torch.unique(idx // shape[-1]).numel()) if len(shape) == 2 else 0
                                for (idx, shape) in ((child.indices[n], child.shapes[n]) for n in child.indices)),
            rows_of_weights_with_child=sum(child.shapes[n][0] for n in child.indices if len(child.shapes[n]) == 2),
            trained_entries=child.k + sum(p.numel() for p in model.head_parameters()),
        )
    return model, batch, optimizer, info
