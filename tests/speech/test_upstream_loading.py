"""Loading an upstream in its final dtype: the same weights as transformers' own loading,
without holding the checkpoint's full-precision tensors.

Oracle: ``AutoModel.from_pretrained(folder)`` (transformers' memory-mapped path) then
``.to(dtype)``, and, for memory, the byte count of the weights the test builds.
"""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoModel, Wav2Vec2Config, Wav2Vec2ForCTC  # noqa: E402

from adtuning import phase_memory  # noqa: E402
from adtuning.speech import build_upstream  # noqa: E402
from adtuning.speech import upstream as upstream_module  # noqa: E402
from adtuning.speech.upstream import _tiny_common  # noqa: E402


def _save(tmp_path, name, *, ctc=False, shard=None, dtype=torch.float32, **overrides):
    config = Wav2Vec2Config(**{**_tiny_common(stable=True), **overrides})
    torch.manual_seed(0)
    model = (Wav2Vec2ForCTC(config) if ctc else AutoModel.from_config(config)).to(dtype)
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def _oracle(folder, dtype):
    from transformers import AutoConfig

    from adtuning.speech.upstream import _disable_training_noise

    config = AutoConfig.from_pretrained(folder)
    _disable_training_noise(config)
    model = AutoModel.from_pretrained(folder, config=config).to(dtype)
    return {f"model.{n}": p for n, p in model.named_parameters()}


def _assert_same(upstream, expected, dtype):
    got = dict(upstream.named_parameters())
    assert list(got) == list(expected)
    for name, value in got.items():
        assert value.dtype == dtype, name
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ctc", "shard"), [(False, None), (True, None), (False, "40KB")])
def test_read_tensors_equal_transformers_loading(tmp_path, dtype, ctc, shard):
    folder = _save(tmp_path, "ckpt", ctc=ctc, shard=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    _assert_same(build_upstream(str(folder), dtype=dtype), _oracle(folder, dtype), dtype)


def test_safetensors_without_pread_falls_back_to_transformers(tmp_path, monkeypatch):
    folder = _save(tmp_path, "ckpt")
    calls = []

    def no_reads(*args, **kwargs):
        calls.append(args)
        return None  # as when safe_open has no backend argument

    monkeypatch.setattr(upstream_module, "_from_pretrained_by_reads", no_reads)
    _assert_same(build_upstream(str(folder), dtype=torch.bfloat16), _oracle(folder, torch.bfloat16), torch.bfloat16)
    assert calls


@pytest.mark.skipif(not phase_memory.reset_rss_peak(), reason="cannot reset VmHWM here (no /proc/self/clear_refs)")
def test_bf16_load_of_an_fp32_checkpoint_holds_no_fp32_copy(tmp_path):
    # ~42M parameters: 168 MB in fp32, 84 MB in bf16. Loading fp32 then casting (or a memory map of
    # the fp32 file kept while reading) peaks at >= 3x the bf16 weights; reading tensor by tensor
    # stays near 1x.
    folder = _save(tmp_path, "medium", hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                   intermediate_size=2048, conv_dim=(512,) * 3)
    build_upstream(str(_save(tmp_path, "tiny")), dtype=torch.bfloat16)  # imports outside the measured phase
    tracker = phase_memory.PhaseMemory()
    with tracker.phase("load") as load:
        upstream = build_upstream(str(folder), dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in upstream.parameters())
    assert weights > 80_000_000
    assert load.rss_peak_bytes - load.rss_start_bytes < 1.8 * weights


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_silences_transformers_loading_bar_and_leaves_it_as_it_was(tmp_path, capfd, progress):
    from transformers.utils import logging as hf_logging

    folder = _save(tmp_path, "plain")
    assert hf_logging.is_progress_bar_enabled()
    build_upstream(str(folder), progress=progress)
    err = capfd.readouterr().err
    # The oracle: transformers' own bar, named "Loading weights", is there unless progress is off.
    assert ("Loading weights" in err) == progress, err[-2000:]
    assert hf_logging.is_progress_bar_enabled()
