"""The ``auto`` speed settings resolve from mocked capability probes: CPU with/without native bf16,
CUDA with/without bf16 tensor cores, conv vs MLP models, short vs long runs; loss reductions and the
VAE's KL stay float32 under bf16 autocast; a compiled step handle leaves the module's state dict
(hence checkpoints) unchanged, and the engine compiles once per run across epochs, evaluation and
resume (a counting backend stands in for Inductor: same tracing, guards and recompile rules, no codegen)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from aedist import precision
from aedist.config import LossConfig, ModelConfig, load_config
from aedist.losses import compute_loss, kl_divergence
from aedist.models import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Set what the CPU probe reports: ``cpu_bf16({"amx_bf16"})`` or ``cpu_bf16(set())``."""
    def set_features(features: set[str]) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda: frozenset(features))
    return set_features


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend CUDA is present with (``cuda(True)``) or without (``cuda(False)``) bf16 tensor cores;
    the emulation flag must be off, or pre-Ampere GPUs would count as bf16-capable."""
    def set_cuda(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return bf16 or including_emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return set_cuda


def conv_model() -> nn.Module:
    return build_model(ModelConfig())


def mlp_model() -> nn.Module:
    return build_model(ModelConfig(name="mlp_ae", hidden=[32], latent_dim=2))


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("features", [{"amx_bf16"}, {"avx512_bf16"}, {"amx_bf16", "avx512_bf16"}, {"bf16"}, {"sve_bf16"}])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_bf16, features: set[str]) -> None:
    cpu_bf16(features)
    assert precision.cpu_supports_bf16()
    assert precision.resolve_mixed_precision("auto", CPU) == "bf16"


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_bf16) -> None:
    cpu_bf16(set())
    assert not precision.cpu_supports_bf16()
    assert precision.resolve_mixed_precision("auto", CPU) == "no"


def test_auto_is_bf16_on_cuda_with_bf16_tensor_cores(cuda, cpu_bf16) -> None:
    cuda(True)
    cpu_bf16(set())  # the CPU's answer must not leak into the GPU's
    assert precision.resolve_mixed_precision("auto", CUDA) == "bf16"


def test_auto_is_fp32_on_cuda_without_bf16_even_where_torch_would_emulate_it(cuda, cpu_bf16) -> None:
    cuda(False)
    cpu_bf16({"amx_bf16"})
    assert precision.resolve_mixed_precision("auto", CUDA) == "no"


@pytest.mark.parametrize("setting", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_precision_passes_through(cpu_bf16, cuda, setting: str, native: bool) -> None:
    cpu_bf16({"amx_bf16"} if native else set())
    cuda(native)
    assert precision.resolve_mixed_precision(setting, CPU) == setting
    assert precision.resolve_mixed_precision(setting, CUDA) == setting


def test_cpu_probe_reads_torch_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    precision.cpu_bf16_features.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "amx_bf16": True, "avx512_bf16": False})
    try:
        assert precision.cpu_bf16_features() == frozenset({"amx_bf16"})
    finally:
        precision.cpu_bf16_features.cache_clear()


@pytest.mark.parametrize("flags, expect", [
    ("fpu sse avx2 avx512f avx512_bf16 amx_tile", {"avx512_bf16"}),
    ("fpu sse avx2 fma", set()),
])
def test_cpu_probe_falls_back_to_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, flags: str, expect: set[str]) -> None:
    """Without torch's query (older torch), the flags line of /proc/cpuinfo decides."""
    precision.cpu_bf16_features.cache_clear()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    try:
        assert precision.cpu_bf16_features() == frozenset(expect)
    finally:
        precision.cpu_bf16_features.cache_clear()


def test_this_machine_probe_agrees_with_torch() -> None:
    """The real probe on the test machine: whatever it says must match torch's own cpuinfo."""
    caps = torch.cpu.get_capabilities()
    assert precision.cpu_supports_bf16() == any(caps.get(f) is True for f in precision.BF16_CPU_FEATURES)


# ----------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("mp", ["no", "bf16"])
def test_channels_last_auto_is_on_for_conv_models_on_cpu(mp: str) -> None:
    assert precision.resolve_channels_last("auto", conv_model(), CPU, mp)


@pytest.mark.parametrize("device, mp", [(CPU, "no"), (CPU, "bf16"), (CUDA, "no"), (CUDA, "bf16")])
def test_channels_last_auto_is_off_for_models_without_convolutions(device: torch.device, mp: str) -> None:
    assert not precision.resolve_channels_last("auto", mlp_model(), device, mp)


@pytest.mark.parametrize("mp, expect", [("bf16", True), ("fp16", True), ("no", False)])
def test_channels_last_auto_on_cuda_follows_the_16_bit_types(mp: str, expect: bool) -> None:
    assert precision.resolve_channels_last("auto", conv_model(), CUDA, mp) is expect


@pytest.mark.parametrize("setting", [True, False])
def test_channels_last_explicit_passes_through(setting: bool) -> None:
    for model in (conv_model(), mlp_model()):
        assert precision.resolve_channels_last(setting, model, CPU, "no") is setting


def test_every_conv_model_of_the_registry_counts_as_conv() -> None:
    assert precision.has_conv(build_model(ModelConfig(name="conv_vae")))
    assert not precision.has_conv(build_model(ModelConfig(name="mlp_vae", hidden=[16], latent_dim=2)))


# ----------------------------------------------------------------------------- compile


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch):
    def set_available(ok: bool) -> None:
        monkeypatch.setattr(precision, "compiler_available", lambda device_type: ok)
    return set_available


def test_compile_auto_is_off_for_short_runs_and_debug(compiler) -> None:
    compiler(True)
    n = precision.COMPILE_MIN_STEPS
    assert not precision.resolve_compile("auto", debug=False, total_steps=8, device=CUDA)
    assert not precision.resolve_compile("auto", debug=False, total_steps=n - 1, device=CUDA)
    assert not precision.resolve_compile("auto", debug=True, total_steps=100 * n, device=CUDA)


def test_compile_auto_is_on_for_long_cuda_runs_where_triton_exists(compiler) -> None:
    compiler(True)
    assert precision.resolve_compile("auto", debug=False, total_steps=precision.COMPILE_MIN_STEPS, device=CUDA)
    compiler(False)
    assert not precision.resolve_compile("auto", debug=False, total_steps=precision.COMPILE_MIN_STEPS, device=CUDA)


@pytest.mark.parametrize("device", [CPU, None])
def test_compile_auto_is_off_on_cpu_even_for_long_runs(compiler, device: torch.device | None) -> None:
    """Measured on this machine kind: compiled CPU steps were no faster than eager at bf16 + channels_last."""
    compiler(True)
    assert not precision.resolve_compile("auto", debug=False, total_steps=100 * precision.COMPILE_MIN_STEPS, device=device)


@pytest.mark.parametrize("setting", [True, False])
def test_compile_explicit_passes_through(compiler, setting: bool) -> None:
    compiler(not setting)
    assert precision.resolve_compile(setting, debug=True, total_steps=1) is setting


def test_seed_schedules_compile_on_cuda_and_the_debug_config_does_not(compiler) -> None:
    """Seed 000 at its own schedule (51 epochs x 375 steps) compiles on a GPU; configs/debug.yaml (2 x 16) does not."""
    compiler(True)
    assert precision.resolve_compile("auto", debug=False, total_steps=51 * 375, device=CUDA)
    assert not precision.resolve_compile("auto", debug=False, total_steps=2 * 16, device=CUDA)
    assert not precision.resolve_compile("auto", debug=False, total_steps=51 * 375, device=CPU)


def test_compile_mode_captures_cuda_graphs_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    model = conv_model()
    precision.compile_model(model, CUDA)
    precision.compile_model(model, CPU)
    assert seen == [{"mode": "reduce-overhead", "dynamic": False}, {"mode": "default", "dynamic": False}]


def test_begin_step_marks_cuda_graph_steps_only_when_compiled_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    precision.begin_step(False, CUDA)
    precision.begin_step(True, CPU)
    assert calls == []
    precision.begin_step(True, CUDA)
    assert calls == [1]


def test_compiled_handle_shares_the_module_and_keeps_its_state_dict_keys() -> None:
    """The compiled handle wraps the very module the engine checkpoints and evaluates: same
    parameter objects, and that module's state dict has no ``_orig_mod.`` prefix, so a checkpoint
    resumes with compile on or off. (torch.compile is lazy: nothing is traced here.)"""
    model = build_model(ModelConfig(channels=[4, 8], latent_dim=2))
    keys = list(model.state_dict())
    forward = precision.compile_model(model, CPU)
    assert forward is not model and forward._orig_mod is model
    assert [id(p) for p in forward.parameters()] == [id(p) for p in model.parameters()]
    assert list(model.state_dict()) == keys


def test_engine_wiring_compiles_once_across_epochs_eval_and_checkpoint(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring the engine uses: prepare the plain module, compile a separate handle for the train
    step, evaluate through ``unwrap_model`` (plain, other batch sizes, no grad). Two epochs with an
    evaluation between them trace the train step once, and the saved state has the plain keys.
    A counting backend stands in for Inductor (same guards and recompile rules, no codegen)."""
    from accelerate import Accelerator

    compiles: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(1)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: real_compile(model, backend=counting, dynamic=dynamic))
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[4, 8], latent_dim=2)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    forward = precision.compile_model(model, CPU)
    for _epoch in range(2):
        for _ in range(3):
            x = torch.rand(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            acc.backward(torch.nn.functional.mse_loss(forward(x).recon, x))
            opt.step()
            opt.zero_grad()
        plain = acc.unwrap_model(model)
        plain.eval()
        with torch.no_grad():
            for n in (32, 5):
                plain(torch.rand(n, 1, 28, 28))
                plain.encode(torch.rand(n, 1, 28, 28))
        plain.train()
    assert len(compiles) == 1  # forward traced once (dynamo's backward graph is part of that compile)
    acc.save_state(str(tmp_path / "ckpt"))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "ckpt" / "model.safetensors"))) == set(build_model(ModelConfig(channels=[4, 8], latent_dim=2)).state_dict())


def test_resolved_settings_are_noted_in_config_yaml_without_changing_what_it_loads_as(tmp_path: Path) -> None:
    from aedist.config import save_config
    from aedist.resume import previous_config

    cfg = load_config(None, [])
    save_config(cfg, tmp_path / "config.yaml")
    before = previous_config(tmp_path)
    precision.note_resolved(tmp_path / "config.yaml", CPU, 2, "bf16", True, False)
    text = (tmp_path / "config.yaml").read_text()
    assert text.endswith("# resolved on cpu x2: train.mixed_precision=bf16 train.channels_last=true train.compile=false\n")
    assert previous_config(tmp_path) == before and before["train"]["mixed_precision"] == "auto"
    assert load_config(tmp_path / "config.yaml").train.mixed_precision == "auto"


# ----------------------------------------------------------------------------- fp32 reductions under autocast


def _fp64_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()


def test_vae_kl_and_loss_terms_are_float32_under_bf16_autocast() -> None:
    """A conv VAE's forward under bf16 autocast yields bf16 heads; every loss term comes out float32
    and equals the float64 reduction of those very bf16 values (a bf16 sum would be off by ~1e-2)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="conv_vae", channels=[4, 8], latent_dim=16))
    x = torch.rand(64, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = compute_loss(out, x, LossConfig(beta=1.0))
    assert out.mu.dtype == out.logvar.dtype == out.recon.dtype == torch.bfloat16  # autocast is really on
    assert {k: v.dtype for k, v in terms.items()} == {"loss": torch.float32, "recon": torch.float32, "kl": torch.float32}
    mse64 = (out.recon.double() - x.double()).pow(2).mean()
    assert terms["recon"].item() == pytest.approx(mse64.item(), rel=1e-6)
    assert terms["kl"].item() * x[0].numel() == pytest.approx(_fp64_kl(out.mu, out.logvar).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_reconstruction_losses_reduce_in_float32_under_autocast(name: str) -> None:
    """Many bf16 values whose bf16 running sum drifts: the reduction must be the float32 one."""
    torch.manual_seed(1)
    pred = torch.rand(256, 3, 32, 32).to(torch.bfloat16)
    target = torch.rand(256, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(build_output(pred), target, LossConfig(name=name))["loss"]
    t = target.double()
    if name == "mse":
        ref = (pred.double() - t).pow(2).mean()
    else:  # the loss's own float32 clamp (1 - 1e-6 is not exact in float32), then float64 arithmetic
        p = pred.float().clamp(1e-6, 1 - 1e-6).double()
        ref = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)  # rounding the target to bf16 is already 4e-6 off


def test_kl_divergence_of_bf16_heads_is_float32() -> None:
    torch.manual_seed(2)
    mu, logvar = torch.randn(512, 64).to(torch.bfloat16), torch.randn(512, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = kl_divergence(mu, logvar)
    assert kl.dtype == torch.float32
    assert kl.item() == pytest.approx(_fp64_kl(mu, logvar).item(), rel=1e-5)


def build_output(recon: torch.Tensor):
    from aedist.models.ae import AEOutput

    return AEOutput(recon, recon.new_zeros(len(recon), 2), None, None)


# ----------------------------------------------------------------------------- the engine's compiled step


def test_engine_compiles_once_across_two_epochs_evaluation_and_resume(tmp_path: Path, tiny_shards: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Trainer with train.compile=true on a tiny model: 2 epochs, each evaluated and
    checkpointed, then resumed for a 3rd epoch with compile on, then for a 4th with compile off.
    Every compile happens at the first train step of a run, none in later epochs or in evaluation;
    a compiled run's checkpoint resumes with compile off (plain state-dict keys)."""
    from aedist.engine import Trainer

    events: list[tuple[int, str]] = []
    where = {"step": 0, "phase": "train"}

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        events.append((where["step"], where["phase"]))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: real_compile(model, backend=counting, dynamic=dynamic))
    real_step, real_eval = Trainer._step, Trainer._evaluate

    def step(self: Trainer, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        where["step"] += 1
        return out

    def evaluate(self: Trainer, *args, **kwargs):
        where["phase"] = "eval"
        try:
            return real_eval(self, *args, **kwargs)
        finally:
            where["phase"] = "train"

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)

    def fit(epochs: int, compile_on: bool) -> tuple[Trainer, list[tuple[int, str]]]:
        where["step"] = 0
        events.clear()
        cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=compiled", "data.batch_size=32",
                                 "data.limit=96", f"train.epochs={epochs}", "train.mixed_precision=bf16", f"train.compile={compile_on}",
                                 "train.cpu=true", "log.wandb=disabled", "log.every=1", "log.probe_size=8", "eval.knn_train=32"])
        trainer = Trainer(cfg)
        assert trainer.fit() == 0
        return trainer, list(events)

    trainer, compiles = fit(2, True)  # 3 steps an epoch
    assert trainer.state.step == 6 and compiles and all(e == (0, "train") for e in compiles), compiles
    trainer, compiles = fit(3, True)
    assert trainer.state.resumed_from == [6] and all(e == (0, "train") for e in compiles), compiles
    trainer, compiles = fit(4, False)
    assert trainer.state.resumed_from == [6, 9] and trainer.state.step == 12 and compiles == []
