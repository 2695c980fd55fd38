"""Throughput figures in metrics.jsonl (tokens/s, TFLOP/s, MFU, peak memory) and the fast paths'
switches and checks (issue 17)."""

import json
import math

import pytest
import torch

from diffcore.callbacks.builtin import progress_figures
from diffcore.config.job import structure_job
from diffcore.errors import ConfigError, UserError
from diffcore.training import fast_paths, run_job
from diffcore.training.throughput import Throughput, compute_precision, device_peak
from tests.jobs import tiny_job

DIT = {"type": "dit", "hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 4, "in_channels": 3,
       "input_size": 8, "num_classes": 4}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "tf32", 417.5),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA L4", "fp16", 121.0),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6),
        ("NVIDIA RTX A6000", "bf16", 154.8),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on Volta
        ("Some Future GPU", "bf16", None),
    ],
)
def test_the_peak_table_matches_torch_device_names(name, precision, peak):
    assert device_peak(name, precision) == peak


def test_the_precision_is_the_mixed_one_else_the_weights_else_tf32_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compute_precision("bf16", torch.float32, True, cuda) == "bf16"
    assert compute_precision("no", torch.bfloat16, True, cuda) == "bf16"  # a bf16 base without mixed precision
    assert compute_precision("no", torch.float32, True, cuda) == "tf32"
    assert compute_precision("no", torch.float32, False, cuda) == "fp32"
    assert compute_precision("no", torch.float32, True, cpu) == "fp32"


@pytest.mark.parametrize(
    ("adapter", "peak", "passes"),
    [(None, 0.5, 3), ({"type": "lora", "rank": 2}, None, 2)],
    ids=["full-finetune-with-peak", "lora-without-peak"],
)
def test_every_logged_step_reports_tokens_flops_mfu_and_peak_memory(tmp_path, adapter, peak, passes):
    """The figures follow from the measured samples/s and the model's own FLOPs count: forward x 3
    for a full finetune, x 2 with the backbone frozen; MFU only against a known peak."""
    pytest.importorskip("diffcore_dit")
    import diffcore

    train = {"steps": 3, "batch_size": 4, "checkpoint_every": 0, "log_every": 1, "peak_tflops": peak}
    job = tiny_job(tmp_path / "out", train=train, callbacks=[{"type": "progress", "enabled": False}])
    job["model"], job["scheduler"] = dict(DIT), {"type": "flow"}
    if adapter is not None:
        job["adapter"] = adapter
    result = run_job(structure_job(job))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]

    model = diffcore.load_model("dit", **{k: v for k, v in DIT.items() if k != "type"})
    latents = torch.zeros(1, 3, 8, 8)  # the synthetic shapes at resolution 8, in pixel space
    tokens, forward = model.sequence_length(latents), model.flops_per_sample(latents)
    assert tokens == 4 and forward > 0
    for row in rows:
        assert row["tokens_per_sec"] == pytest.approx(row["samples_per_sec"] * tokens, rel=1e-9)
        assert row["tflops"] == pytest.approx(row["samples_per_sec"] * forward * passes / 1e12, rel=1e-9)
        if peak is None:
            assert "mfu" not in row  # a CPU is in no table
        else:
            assert row["mfu"] == pytest.approx(row["tflops"] / peak, rel=1e-9)
        # the process's peak resident set: at least the interpreter with torch loaded
        assert 50 < row["peak_mem_mib"] < 1e6


class _Model:
    latent_channels, latent_downscale = 4, 8

    def __init__(self, flops):
        self.flops = flops

    def sequence_length(self, latents):
        return latents.shape[-2] * latents.shape[-1]

    def flops_per_sample(self, latents):
        return None if self.flops is None else self.flops * latents.shape[-1]


def test_buckets_and_ranks_are_counted_per_shape_and_unknown_flops_give_no_mfu():
    meter = Throughput(model=_Model(1e9), passes=3, peak=100.0, world_size=2)
    meter.count({"pixels": torch.zeros(2, 3, 64, 32)})  # latents 4 x 8 x 4: 32 tokens
    meter.count({"latents": torch.zeros(3, 4, 4, 8)})  # cached latents, 32 tokens, another width
    figures = meter.figures(2.0)
    assert figures["tokens_per_sec"] == (2 * 32 + 3 * 32) * 2 / 2.0
    flops = (2 * 4e9 + 3 * 8e9) * 3 * 2  # per shape, x3 passes, x2 ranks
    assert figures["tflops"] == pytest.approx(flops / 2.0 / 1e12)
    assert figures["mfu"] == pytest.approx(figures["tflops"] / 200.0)  # two devices' peak
    assert meter.figures(1.0)["tokens_per_sec"] == 0  # a new window

    blind = Throughput(model=_Model(None), passes=2, peak=100.0)
    blind.count({"pixels": torch.zeros(1, 3, 64, 64)})
    figures = blind.figures(1.0)
    assert "tflops" not in figures and "mfu" not in figures and figures["tokens_per_sec"] == 64

    blind.count({"captions": ["a batch this counter cannot size"]})
    figures = blind.figures(1.0)
    assert "tokens_per_sec" not in figures and figures["peak_mem_mib"] > 0


def test_the_progress_bar_shows_mfu_and_peak_memory_when_known():
    logs = {"loss": 0.5, "lr": 1e-4, "mfu": 0.4123, "peak_mem_mib": 2048.0}
    assert progress_figures(logs) == {"loss": "0.5000", "lr": "1.00e-04", "mfu": "41.2%", "mem": "2.0GiB"}
    assert "mfu" not in progress_figures({"loss": 0.5, "lr": 1e-4, "peak_mem_mib": 1.0})


@pytest.mark.parametrize(("value", "message"), [(["flash", "fast"], "unknown backend 'fast'"), ([], "at least one")])
def test_bad_sdpa_backend_names_are_config_errors(tmp_path, value, message):
    with pytest.raises(ConfigError) as caught:
        structure_job(tiny_job(tmp_path, train={"sdpa_backends": value}))
    assert [p.path for p in caught.value.problems] == ["$.train.sdpa_backends"]
    assert message in caught.value.problems[0].message


def test_backends_that_cannot_run_here_are_refused_before_training():
    with pytest.raises(UserError) as caught:
        fast_paths.check_backends_run(["efficient"], torch.device("cpu"))
    assert caught.value.where == "$.train.sdpa_backends" and "math" in caught.value.hint
    fast_paths.check_backends_run(["efficient", "math"], torch.device("cpu"))
    q = torch.randn(1, 1, 4, 8)
    with fast_paths.attention_backends(["math"]):
        from torch.backends.cuda import flash_sdp_enabled, math_sdp_enabled

        expected = (q @ q.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ q
        assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, q, q), expected, atol=1e-6)

        assert math_sdp_enabled() and not flash_sdp_enabled()
    assert flash_sdp_enabled()  # torch's own choice again afterwards


def test_adamw_is_fused_on_cpu_and_cuda_and_an_explicit_choice_is_kept():
    from diffcore.builtin.optimizers import AdamWConfig, _adamw

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert fast_paths.adamw_kernels(params, None, None) == {"fused": True, "foreach": None}
    assert fast_paths.adamw_kernels([{"params": params}], None, None) == {"fused": True, "foreach": None}
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]  # a device without the fused kernel
    assert fast_paths.adamw_kernels(meta, None, None) == {"fused": None, "foreach": True}
    assert fast_paths.adamw_kernels(params, False, None) == {"fused": False, "foreach": None}
    assert _adamw(params, AdamWConfig(), 1e-3).defaults["fused"] is True
    assert _adamw(params, AdamWConfig(foreach=False), 1e-3).defaults["foreach"] is False


def test_channels_last_goes_to_convolutional_modules_only():
    unet_like = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1))
    patchify = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 2, stride=2), torch.nn.Linear(8, 8))
    assert fast_paths.is_convolutional(unet_like) and not fast_paths.is_convolutional(patchify)
    assert fast_paths.to_channels_last([unet_like, patchify]) == [unet_like]
    assert unet_like[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not patchify[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(unet_like(x), unet_like(x.contiguous(memory_format=torch.channels_last)), atol=1e-6)
    assert fast_paths.use_channels_last("auto", torch.device("cpu")) is False
    assert fast_paths.use_channels_last("auto", torch.device("cuda")) is True
    assert fast_paths.use_channels_last(True, torch.device("cpu")) is True


def test_fp32_zero0_clips_in_the_loop_as_deepspeed_clips_under_zero1(tmp_path):
    """Without ZeRO in fp32 the loop clips with torch's foreach kernels instead of DeepSpeed (which
    all-reduces the norm even alone): the same losses as DeepSpeed's own clipping under ZeRO-1, and
    clipping that bites (SGD, so the update scales with the clipped gradient)."""
    pytest.importorskip("diffcore_dit")
    from diffcore.training.deepspeed_config import deepspeed_config, loop_clips_gradients

    def losses(name, grad_clip, stage):
        train = {"steps": 2, "batch_size": 4, "checkpoint_every": 0, "lr": 0.5, "grad_clip": grad_clip,
                 "optimizer": {"type": "sgd"}, "deepspeed": {"zero_stage": stage}}  # fmt: skip
        job = tiny_job(tmp_path / name, train=train, callbacks=[{"type": "progress", "enabled": False}])
        job["model"], job["scheduler"] = dict(DIT), {"type": "flow"}
        parsed = structure_job(job)
        assert loop_clips_gradients(parsed) == (stage == 0 and grad_clip is not None)
        assert deepspeed_config(parsed, 1)["gradient_clipping"] == (0.0 if stage == 0 else grad_clip)
        out = run_job(parsed).output_dir
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    ours, deepspeeds, unclipped = losses("loop", 1e-3, 0), losses("zero1", 1e-3, 1), losses("free", None, 0)
    assert ours == pytest.approx(deepspeeds, rel=1e-5)
    assert abs(ours[-1] - unclipped[-1]) > 1e-3 * abs(unclipped[-1])
