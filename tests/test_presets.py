"""Presets: each builds a working UNet2DModel + DDPMScheduler, matches the issue's numbers, and fails early."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from hypothesis import given, settings
from hypothesis import strategies as st

from punkdiff.cli import main as cli_main
from punkdiff.presets import (
    BETA_SCHEDULES,
    PRESETS,
    PresetError,
    PresetWarning,
    SchedulerSpec,
    apply_overrides,
    count_parameters,
    get_preset,
    load_config_file,
    parse_set_flags,
    resolve_preset,
)

ALL = sorted(PRESETS)
SEEDS_SCHEDULE = {"scheduler": {"rescale_betas_zero_snr": False, "prediction_type": "epsilon"}}
SMALL = ["mnist-fast-16", "mnist-28", "punks-24"]  # the three MNIST-16 presets share one UNet


def build(preset, device: str = "cpu") -> UNet2DModel:
    with torch.device(device):
        return UNet2DModel(**preset.model.unet_config())


def attention_sizes(preset) -> dict[str, set[int]]:
    """Spatial sizes seen by every attention layer in a (meta-device) forward pass, by UNet part."""
    unet = build(preset, "meta")
    seen: dict[str, set[int]] = {"down": set(), "up": set(), "mid": set()}

    def hook(name):
        part = "down" if name.startswith("down_blocks") else "up" if name.startswith("up_blocks") else "mid"

        def record(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            assert x.shape[-1] == x.shape[-2]
            seen[part].add(x.shape[-1])

        return record

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(hook(name), with_kwargs=True)
    m = preset.model
    with torch.device("meta"):
        out = unet(torch.zeros(2, m.in_channels, m.sample_size, m.sample_size), torch.tensor([1, 2])).sample
    assert out.shape == (2, m.out_channels, m.sample_size, m.sample_size)
    return seen


# --- every preset is a real, consistent configuration -------------------------------------------------


def test_the_issue_presets_exist():
    res = {name: (p.data.dataset, p.data.resolution) for name, p in PRESETS.items()}
    mnist = [r for d, r in res.values() if d == "ylecun/mnist"]
    assert mnist.count(16) >= 3 and ({28, 32} & set(mnist))
    assert {r for d, r in res.values() if d == "huggingnft/cryptopunks"} >= {24, 32}
    assert {r for d, r in res.values() if d == "nielsr/CelebA-faces"} >= {64, 128}
    assert res["imagefolder-128"] == (None, 128)


@pytest.mark.parametrize("name", ALL)
def test_preset_validates_and_builds_scheduler(name):
    preset = get_preset(name).validate()
    sched = DDPMScheduler(**preset.scheduler.ddpm_config())
    T = preset.scheduler.num_train_timesteps
    assert sched.betas.shape == (T,)
    assert torch.all(sched.betas > 0) and torch.all(sched.betas[:-1] < 1)
    # zero terminal SNR: the last step destroys the signal (beta = 1, alpha_bar = 0)
    assert (sched.betas[-1] == 1) == preset.scheduler.rescale_betas_zero_snr
    assert torch.all(sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1])  # noise keeps increasing
    # the model sees exactly what the data produces
    assert preset.model.in_channels == preset.model.out_channels == preset.data.channels
    assert preset.model.sample_size == preset.data.resolution


@pytest.mark.parametrize("name", ALL)
def test_attention_runs_exactly_at_the_stated_resolutions(name):
    """Forward pass on the meta device (free even for the 190M-parameter preset), hooks on every attention."""
    preset = get_preset(name)
    seen = attention_sizes(preset)
    assert seen["down"] == seen["up"] == set(preset.model.attention_resolutions)
    lowest = preset.model.resolutions()[-1]
    assert seen["mid"] == ({lowest} if preset.model.mid_attention else set())


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_forward_pass_on_cpu(name):
    preset = get_preset(name)
    m = preset.model
    torch.manual_seed(0)
    unet = build(preset).eval()
    x = torch.randn(2, m.in_channels, m.sample_size, m.sample_size)
    with torch.no_grad():
        out = unet(x, torch.tensor([0, 999 % preset.scheduler.num_train_timesteps])).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in unet.parameters()) == count_parameters(preset.model)


@settings(max_examples=25, deadline=None)
@given(
    levels=st.integers(1, 4),
    base=st.sampled_from([8, 16, 24]),
    layers=st.integers(1, 3),
    attention_levels=st.sets(st.integers(0, 3)),
    mid_attention=st.booleans(),
    head_dim=st.sampled_from([4, 8, 12]),
    channels=st.sampled_from([1, 3]),
)
def test_parameter_count_is_the_real_unets(levels, base, layers, attention_levels, mid_attention, head_dim, channels):
    """`punkdiff presets` counts without torch; the count must be what diffusers builds, for any configuration."""
    from punkdiff.presets import ModelSpec

    widths = tuple(base * (1 + i // 2) for i in range(levels))
    size = 2 ** (levels + 1)
    model = ModelSpec(size, channels, channels, widths, layers_per_block=layers, mid_attention=mid_attention,
                      attention_resolutions=tuple(size // 2**i for i in attention_levels if i < levels),
                      norm_num_groups=4, attention_head_dim=head_dim)
    with torch.device("meta"):
        unet = UNet2DModel(**model.unet_config())
    assert count_parameters(model) == sum(p.numel() for p in unet.parameters())


def test_mnist_16_presets_are_light():
    light = [count_parameters(get_preset(n).model) for n in ("mnist-baseline-16", "mnist-fast-16", "mnist-hp-16")]
    assert max(light) < count_parameters(get_preset("mnist-28").model) / 2
    assert all(not get_preset(n).model.attention_resolutions for n in ("mnist-baseline-16", "mnist-fast-16"))


@pytest.mark.parametrize(
    ("name", "T", "beta_end", "lr"),
    [("mnist-baseline-16", 1000, 0.02, 3e-4), ("mnist-fast-16", 300, 0.02, 3e-4), ("mnist-hp-16", 1000, 0.01, 2e-4)],
)
def test_mnist_schedules_match_the_issue(name, T, beta_end, lr):
    """The original projects' betas exactly, once the zero-terminal-SNR remedy the presets ship is turned off."""
    preset = resolve_preset(name, None, SEEDS_SCHEDULE) if name != "mnist-baseline-16" else get_preset(name)
    sched = DDPMScheduler(**preset.scheduler.ddpm_config())
    torch.testing.assert_close(sched.betas, torch.linspace(1e-4, beta_end, T, dtype=torch.float32))
    assert preset.train.learning_rate == pytest.approx(lr)
    assert preset.data.channels == 1 and not preset.data.random_flip


def test_mnist_28_is_residual_attention_unet_with_cosine_schedule():
    preset = get_preset("mnist-28")
    cfg = preset.model.unet_config()
    assert cfg["sample_size"] == 28 and cfg["in_channels"] == 1
    assert "AttnDownBlock2D" in cfg["down_block_types"]
    assert DDPMScheduler(**preset.scheduler.ddpm_config()).config.beta_schedule == "squaredcos_cap_v2"


def cosine_betas(T: int) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17, with betas clipped at 0.999."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])


@pytest.mark.parametrize("T", [300, 1000])
def test_cosine_alias_gives_the_cosine_schedule(T):
    overrides = {"scheduler": {"beta_schedule": "cosine", "num_train_timesteps": T}}
    preset = apply_overrides(get_preset("punks-24"), overrides)
    sched = DDPMScheduler(**preset.validate().scheduler.ddpm_config())
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(sched.betas.double(), cosine_betas(T).double(), atol=1e-6, rtol=1e-5)


def test_quadratic_alias_gives_linspace_of_square_roots_squared():
    preset = apply_overrides(
        get_preset("mnist-baseline-16"), {"scheduler": {"beta_schedule": "quadratic", "beta_end": 0.02}}
    ).validate()
    sched = DDPMScheduler(**preset.scheduler.ddpm_config())
    expected = torch.linspace(math.sqrt(1e-4), math.sqrt(0.02), 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.betas.double(), expected, atol=1e-7, rtol=1e-5)
    linear = DDPMScheduler(**get_preset("mnist-baseline-16").scheduler.ddpm_config()).betas
    assert not torch.allclose(sched.betas, linear)  # quadratic really differs from linear in the middle


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusers_schedule_names_pass_through(schedule):
    preset = apply_overrides(get_preset("punks-24"), {"scheduler": {"beta_schedule": schedule}}).validate()
    assert DDPMScheduler(**preset.scheduler.ddpm_config()).config.beta_schedule == schedule


def test_imagefolder_128_recipe():
    preset = get_preset("imagefolder-128")
    m = preset.model
    assert m.block_out_channels == (192, 384, 576, 768)  # base 192, multipliers 1,2,3,4
    assert m.dropout == 0.1 and preset.train.ema_decay == 0.999 and preset.train.use_ema
    assert preset.scheduler.beta_schedule == "cosine"
    assert attention_sizes(preset)["down"] == {16}
    unet = build(preset, "meta")
    assert unet.config.dropout == 0.1
    assert preset.data.center_crop and preset.data.random_flip


# --- invalid combinations fail early, saying what to change -------------------------------------------


def test_sample_size_not_divisible_suggests_sizes_that_work():
    preset = get_preset("mnist-fast-16")  # 3 levels: downsampling factor 4
    with pytest.raises(PresetError, match="not divisible by the UNet's downsampling factor 4") as err:
        resolve_preset("mnist-fast-16", overrides={"model": {"sample_size": 30}, "data": {"resolution": 30}})
    suggested = [int(s) for s in re.search(r"\[([\d, ]+)\]", str(err.value)).group(1).split(",")]
    assert suggested and all(s % 4 == 0 for s in suggested)
    for size in suggested:  # following the advice gives a valid preset
        apply_overrides(preset, {"model": {"sample_size": size}, "data": {"resolution": size}}).validate()


def test_channel_mismatch_with_data_says_which_keys_to_set():
    with pytest.raises(PresetError, match=r"set model.in_channels and model.out_channels to 3") as err:
        resolve_preset("mnist-fast-16", overrides={"data": {"channels": 3}})
    assert "1/1" in str(err.value)
    fixed = resolve_preset("mnist-fast-16", overrides={"data": {"channels": 3}, "model": {"in_channels": 3,
                                                                                         "out_channels": 3}})
    assert build(fixed, "meta").config.in_channels == 3
    with pytest.raises(PresetError, match="in/out channels 3/1"):
        resolve_preset("punks-24", overrides={"model": {"out_channels": 1}})


def test_attention_at_unreached_resolution_lists_the_levels():
    with pytest.raises(PresetError, match=r"attention at \[12\] px is never reached.*\[32, 16, 8, 4\]"):
        resolve_preset("punks-32", overrides={"model": {"attention_resolutions": [16, 12]}})


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(PresetError, match="unknown beta schedule 'sigmoid'") as err:
        resolve_preset("punks-24", overrides={"scheduler": {"beta_schedule": "sigmoid"}})
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2", "quadratic", "cosine"):
        assert name in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(PresetError) as err:
        resolve_preset("punks-32", overrides={"scheduler": {"beta_schedule": "nope"}, "data": {"channels": 1},
                                              "train": {"ema_decay": 1.5}})
    message = str(err.value)
    assert "'punks-32'" in message and "beta schedule" in message and "in/out channels" in message
    assert "ema_decay" in message


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(PresetError, match="unknown preset 'punks-64'") as err:
        get_preset("punks-64")
    assert all(name in str(err.value) for name in PRESETS)
    with pytest.raises(PresetError, match="no preset given"):
        resolve_preset()


# --- overrides: YAML / JSON files and --set flags ------------------------------------------------------


def test_yaml_config_file_overrides_and_names_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: punks-24\n"
        "train:\n  learning_rate: 1e-4\n  batch_size: 16\n"  # YAML reads an unquoted 1e-4 as a string
        "model:\n  attention_resolutions: 6\n  dropout: 0.1\n"
        "scheduler:\n  beta_schedule: cosine\n"
    )
    preset = resolve_preset(config_file=path)
    base = get_preset("punks-24")
    assert preset.name == "punks-24"
    assert preset.train.learning_rate == pytest.approx(1e-4) and isinstance(preset.train.learning_rate, float)
    assert preset.train.batch_size == 16
    assert preset.model.attention_resolutions == (6,) and preset.model.dropout == 0.1
    assert preset.scheduler.beta_schedule == "cosine"
    assert preset.model.block_out_channels == base.model.block_out_channels
    assert preset.data == base.data
    assert attention_sizes(preset)["down"] == {6}


def test_json_config_file_and_cli_flags_take_precedence(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "mnist-fast-16", "train": {"learning_rate": 1e-3, "epochs": 7}}))
    flags = parse_set_flags(["train.learning_rate=5.0e-5", "scheduler.num_train_timesteps=50"])
    preset = resolve_preset(config_file=path, overrides=flags)
    assert preset.train.learning_rate == pytest.approx(5e-5)  # the flag beats the file
    assert preset.train.epochs == 7  # the file beats the preset
    assert DDPMScheduler(**preset.scheduler.ddpm_config()).betas.shape == (50,)
    # an explicit name beats the file's `preset:`
    assert resolve_preset("mnist-hp-16", config_file=path).scheduler.beta_end == 0.01


def test_unknown_keys_and_sections_fail(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("preset: punks-24\ntrain:\n  learnig_rate: 0.1\n")
    with pytest.raises(PresetError, match=r"unknown key train.learnig_rate.*learning_rate"):
        resolve_preset(config_file=path)
    with pytest.raises(PresetError, match="unknown config section 'optim'"):
        resolve_preset("punks-24", overrides=parse_set_flags(["optim.lr=1"]))
    with pytest.raises(PresetError, match="must be a mapping"):
        apply_overrides(get_preset("punks-24"), {"train": 3})


def test_bad_config_files_fail_clearly(tmp_path):
    with pytest.raises(PresetError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PresetError, match="mapping at the top level"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PresetError, match="could not be parsed"):
        load_config_file(tmp_path / "broken.json")


def test_parse_set_flags_types_and_format():
    out = parse_set_flags([
        "train.learning_rate=1e-3",
        "model.block_out_channels=[32, 64]",
        "train.use_ema=false",
        "train.max_steps=null",
        "data.background='#000000'",
        "data.dataset=some/dataset",
    ])
    assert out["model"] == {"block_out_channels": [32, 64]}
    assert out["train"]["use_ema"] is False and out["train"]["max_steps"] is None
    assert out["data"] == {"background": "#000000", "dataset": "some/dataset"}
    preset = apply_overrides(get_preset("mnist-fast-16"), out)
    assert preset.train.learning_rate == pytest.approx(1e-3)
    assert preset.model.block_out_channels == (32, 64)
    for bad in ("train.learning_rate", "learning_rate=1", "=3"):
        with pytest.raises(PresetError, match="SECTION.KEY=VALUE"):
            parse_set_flags([bad])


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("train.learning_rate=fast", "train.learning_rate"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.use_ema=maybe", "train.use_ema"),
        ("data.background=#000000", "data.background"),  # unquoted: YAML reads a comment, i.e. None
        ("model.attention_resolutions=[16, x]", "model.attention_resolutions"),
    ],
)
def test_wrongly_typed_overrides_name_the_key(flag, key):
    with pytest.raises(PresetError, match=re.escape(key)):
        resolve_preset("punks-32", overrides=parse_set_flags([flag]))


def test_get_preset_returns_an_independent_copy():
    preset = get_preset("celeba-64")
    preset.train.learning_rate = 1.0
    preset.model.attention_resolutions = (8,)
    assert PRESETS["celeba-64"].train.learning_rate == 2e-4
    assert get_preset("celeba-64").model.attention_resolutions == (16,)


@pytest.mark.parametrize("name", ALL)
def test_to_dict_round_trips_through_json(name):
    """What goes into training_summary.json can be fed back as overrides and gives the same preset."""
    preset = get_preset(name)
    again = apply_overrides(get_preset("mnist-fast-16"), json.loads(json.dumps(preset.to_dict())))
    assert again == preset


# --- `punkdiff presets` ---------------------------------------------------------------------------------


def test_cli_presets_lists_every_preset_with_resolution_channels_and_parameters():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["presets"]) == 0
    rows = {line.split()[0]: line.split() for line in buf.getvalue().splitlines()[1:] if line.strip()}
    assert set(rows) == set(PRESETS)
    for name, cells in rows.items():
        preset = PRESETS[name]
        assert cells[1] == f"{preset.data.resolution}px"
        assert cells[2] == ("L" if preset.data.channels == 1 else "RGB")
        assert cells[3] == ",".join(map(str, preset.model.block_out_channels))
        assert cells[5] == str(preset.scheduler.num_train_timesteps)
        params = re.fullmatch(r"([\d.]+)M", cells[7])
        assert params, cells
        assert abs(float(params.group(1)) * 1e6 - count_parameters(preset.model)) <= 5_000


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"train": {"lr_scheduler": "foo"}}, "train.lr_scheduler"),
        ({"train": {"sample_inference_steps": 500}, "scheduler": {"num_train_timesteps": 300}},
         "sample_inference_steps"),
        ({"data": {"background": "notacolor"}}, "data.background"),
        ({"train": {"checkpoints_total_limit": 0}}, "checkpoints_total_limit"),
        ({"train": {"checkpoints_total_limit": -1}}, "checkpoints_total_limit"),
        ({"train": {"num_sample_images": 0}}, "num_sample_images"),
        ({"train": {"lr_warmup_steps": -5}}, "lr_warmup_steps"),
        ({"train": {"max_steps": 0}}, "max_steps"),
        ({"train": {"checkpoint_every": 0}}, "checkpoint_every"),
        ({"data": {"max_samples": 0}}, "max_samples"),
    ],
)
def test_training_settings_that_would_fail_later_fail_at_validation(overrides, named):
    with pytest.raises(PresetError, match=named):
        apply_overrides(get_preset("mnist-fast-16"), overrides).validate()


def test_lr_scheduler_names_follow_diffusers():
    from diffusers.optimization import SchedulerType

    from punkdiff.presets import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


# --- noise that reaches noise ------------------------------------------------------------------------


@given(
    T=st.integers(20, 1200),
    schedule=st.sampled_from(BETA_SCHEDULES),
    beta_end=st.floats(0.005, 0.04),
    scaled=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_terminal_alpha_bar_is_diffusers_last_alphas_cumprod(T, schedule, beta_end, scaled):
    spec = SchedulerSpec(num_train_timesteps=T, beta_schedule=schedule, beta_end=beta_end,
                         scale_betas_by_timesteps=scaled)
    if spec.betas_range()[1] >= 1:
        return
    expected = DDPMScheduler(**spec.ddpm_config()).alphas_cumprod[-1].item()
    assert spec.terminal_alpha_bar() == pytest.approx(expected, rel=1e-3, abs=1e-12)


@pytest.mark.parametrize(("name", "alpha_bar", "offers_scaling"), [("mnist-fast-16", 0.048, True),
                                                                     ("mnist-hp-16", 0.0063, False)])
def test_schedules_that_stop_short_of_noise_warn_with_the_remedies(name, alpha_bar, offers_scaling):
    """The presets ship the remedy; the original projects' schedule, one override away, still warns."""
    with pytest.warns(PresetWarning, match=f"alpha_bar\\(T-1\\) = {alpha_bar}") as caught:
        resolve_preset(name, None, SEEDS_SCHEDULE)
    message = str(caught[0].message)
    assert "rescale_betas_zero_snr=true" in message and "v_prediction" in message
    assert ("scale_betas_by_timesteps=true" in message) == offers_scaling  # x 1000/T does nothing at T = 1000


@pytest.mark.parametrize(
    "overrides",
    [{"scheduler": {"scale_betas_by_timesteps": True, "rescale_betas_zero_snr": False, "prediction_type": "epsilon"}},
     {"scheduler": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}}],
    ids=["scaled-betas", "zero-snr-v"],
)
def test_the_remedies_silence_the_warning_and_reach_noise(overrides, recwarn):
    preset = resolve_preset("mnist-fast-16", None, overrides)  # validates
    assert not [w for w in recwarn if issubclass(w.category, PresetWarning)]
    sched = DDPMScheduler(**preset.scheduler.ddpm_config())
    assert sched.alphas_cumprod[-1] < 1e-3


def test_zero_terminal_snr_with_epsilon_warns_to_use_v_prediction():
    with pytest.warns(PresetWarning, match="use scheduler.prediction_type=v_prediction"):
        resolve_preset("mnist-baseline-16", None, {"scheduler": {"rescale_betas_zero_snr": True}})


@pytest.mark.parametrize("name", ALL)
def test_every_preset_reaches_noise_without_warnings(name, recwarn):
    get_preset(name).validate()
    assert not [w for w in recwarn if issubclass(w.category, PresetWarning)]
    assert get_preset(name).scheduler.terminal_alpha_bar() < 1e-3


# --- hostile values: every one refused by validation with the key named, before anything loads -----------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate must be a finite number"),
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate must be a finite number"),
        ({"train": {"max_grad_norm": float("nan")}}, "train.max_grad_norm must be a finite number"),
        ({"train": {"ema_power": float("nan")}}, "train.ema_power must be a finite number"),
        ({"train": {"adam_beta1": 1.0}}, "adam_beta1 and adam_beta2 must be in"),
        ({"train": {"adam_beta2": -0.1}}, "adam_beta1 and adam_beta2 must be in"),
        ({"train": {"adam_epsilon": 0.0}}, "train.adam_epsilon must be positive"),
        ({"train": {"adam_weight_decay": -1.0}}, "train.adam_weight_decay must be >= 0"),
        ({"model": {"dropout": 1.0}}, r"model.dropout must be in \[0, 1\)"),
        ({"model": {"dropout": -0.5}}, r"model.dropout must be in \[0, 1\)"),
        ({"model": {"block_out_channels": []}}, "block_out_channels must be a non-empty list"),
        ({"model": {"block_out_channels": [-8, 16, 16]}}, "block_out_channels must be a non-empty list"),
        ({"model": {"norm_num_groups": 0}}, "norm_num_groups must be at least 1"),
        ({"model": {"norm_num_groups": -4}}, "norm_num_groups must be at least 1"),
        ({"model": {"layers_per_block": 0}}, "layers_per_block must be at least 1"),
        ({"model": {"attention_head_dim": 0}}, "attention_head_dim must be at least 1"),
        ({"model": {"sample_size": 0}, "data": {"resolution": 0}}, "model.sample_size must be in"),
        ({"model": {"sample_size": -16}, "data": {"resolution": -16}}, "data.resolution must be in"),
        ({"model": {"sample_size": 2**20}, "data": {"resolution": 2**20}}, "model.sample_size must be in"),
        ({"model": {"sample_size": 2}, "data": {"resolution": 2}}, "must be at least 2\\*\\*2"),
        ({"scheduler": {"num_train_timesteps": 10**9}}, "num_train_timesteps must be at most"),
        ({"train": {"ema_inv_gamma": 0.0}}, "train.ema_inv_gamma must be positive"),
        ({"train": {"num_sample_images": 200000}}, "num_sample_images must be at most"),
        ({"train": {"batch_size": 10**40}}, "absurdly large"),
        ({"name": ["a", "list"]}, "name must be a string"),
    ],
)
def test_hostile_values_are_refused_with_the_key_named(overrides, named):
    with pytest.raises(PresetError, match=named):
        apply_overrides(get_preset("mnist-fast-16"), overrides).validate()


@pytest.mark.parametrize(
    ("text", "suffix", "named"),
    [
        ("preset: [mnist-fast-16]\n", ".yaml", "preset must be a preset name"),
        ("preset: {a: 1}\n", ".yaml", "preset must be a preset name"),
        ('{"preset": "mnist-fast-16", "train": {"learning_rate": NaN}}', ".json", "must be a finite number"),
        ('{"preset": "mnist-fast-16", "train": {"learning_rate": Infinity}}', ".json", "must be a finite number"),
        ("preset: mnist-fast-16\ntrain: {learning_rate: .nan}\n", ".yaml", "must be a finite number"),
        ("preset: mnist-fast-16\nname: {x: 1}\n", ".yaml", "name must be a string"),
    ],
)
def test_hostile_config_files_are_refused(tmp_path, text, suffix, named):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    with pytest.raises(PresetError, match=named):
        resolve_preset(config_file=path)


def test_non_utf8_and_folder_configs_say_what_is_wrong(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("preset: mnist-fast-16\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PresetError, match="not UTF-8"):
        resolve_preset(config_file=path)
    with pytest.raises(PresetError, match="is a folder"):
        resolve_preset(config_file=tmp_path)


def test_yaml_tags_that_would_run_code_are_refused_and_never_run(tmp_path):
    """`yaml.load` would call os.system here; the marker file proves nothing ran."""
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    config = tmp_path / "evil.yaml"
    config.write_text(f"preset: mnist-fast-16\ndescription: {payload}\n")
    with pytest.raises(PresetError, match="could not be parsed"):
        resolve_preset(config_file=config)
    with pytest.raises(PresetError, match="not valid YAML"):
        parse_set_flags([f"train.learning_rate={payload}"])
    assert not marker.exists()


_FIELDS = [(section, key) for section, spec in get_preset("mnist-fast-16").to_dict().items()
           if isinstance(spec, dict) for key in spec]
_HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-8, max_value=128), max_size=5),
    st.lists(st.one_of(st.text(max_size=3), st.floats(), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _built(preset) -> None:
    """What training builds first: a preset that validates must give a real UNet and noise schedule."""
    with torch.device("meta"):
        UNet2DModel(**preset.model.unet_config())
    DDPMScheduler(**preset.scheduler.ddpm_config())


def _names_what_was_refused(message: str, preset: str, fields: list[tuple[str, str]]) -> bool:
    """A refusal names the field it refuses (`section.key`, or the `--set` item), or the preset whose checks
    failed, with one line per problem."""
    named = [f"{section}.{key}" for section, key in fields] + [f"preset {preset!r}", "--set "]
    return any(name in message for name in named)


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(["mnist-fast-16", "punks-24"]),
    changes=st.lists(st.tuples(st.sampled_from(_FIELDS), _HOSTILE), min_size=1, max_size=4),
)
def test_fuzzed_overrides_are_refused_or_build(base, changes):
    """Any value in any field: a PresetError that names a problem, or a preset whose UNet and schedule build."""
    overrides: dict = {}
    for (section, key), value in changes:
        overrides.setdefault(section, {})[key] = value
    try:
        preset = resolve_preset(base, overrides=overrides)
    except PresetError as err:
        assert _names_what_was_refused(str(err), base, [field for field, _ in changes]), str(err)
        return
    _built(preset)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(_FIELDS), raw=st.one_of(st.text(max_size=20), st.from_regex(r"\[?[-0-9.e,na ]*\]?")))
def test_fuzzed_set_flags_are_refused_or_build(field, raw):
    """`--set section.key=<any text>`: YAML errors, type errors and range errors all end in a PresetError."""
    try:
        preset = resolve_preset("mnist-fast-16", overrides=parse_set_flags([f"{field[0]}.{field[1]}={raw}"]))
    except PresetError as err:
        assert _names_what_was_refused(str(err), "mnist-fast-16", [field]), str(err)
        return
    _built(preset)
