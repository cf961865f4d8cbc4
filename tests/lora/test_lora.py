"""LoRA core: the wrapped Linear, injection by name, counting, merging and state dicts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from minituner.lora import (
    MINIGPT_TARGETS,
    FrozenBase,
    LoRAConfig,
    LoRALinear,
    MergeReport,
    apply_lora,
    count_lora_params,
    disable_adapters,
    frozen_base,
    load_lora_state_dict,
    lora_layers,
    lora_param_table,
    lora_ratio,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    model_lora_config,
    suffix_matches,
    unmerge_lora,
    wrap_minigpt_with_lora,
)
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.training.loop import build_optimizer


def make_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def tokens(seed: int = 1, batch: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> None:
    """A few AdamW steps on random next-token data, so B moves away from zero."""
    optimizer = build_optimizer(model, lr=lr)
    data = tokens(seed=7, batch=8, seq=17)
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("r", [0, 1, 8, 32])
@pytest.mark.parametrize("init", ["gaussian", "gaussian_std", "kaiming"])
def test_output_equals_base_at_init(r, init):
    model = make_model()
    x = tokens()
    with torch.no_grad():
        reference = model(x)
    wrap_minigpt_with_lora(model, r=r, init=init, seed=3)
    assert len(lora_layers(model)) == 12
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_only_lora_tensors_get_gradients():
    model = wrap_minigpt_with_lora(make_model(), r=4, seed=0)
    x = tokens()
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    for name, param in model.named_parameters():
        is_lora = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None) == is_lora, name
    # B = 0 at init, so A gets no gradient signal yet but B does.
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_merge_matches_unmerged_after_training():
    model = wrap_minigpt_with_lora(make_model(), r=8, seed=0)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    train_steps(model)
    for name, param in model.named_parameters():  # the base did not move
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name]), name
    assert all(layer.lora_B.abs().max() > 0 for _, layer in lora_layers(model))
    x = tokens(seed=11)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
    report = merge_lora(model, probe=x)
    assert isinstance(report, MergeReport) and report.n_layers == 12 and report.target == "float"
    with torch.no_grad():
        merged = model(x)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert report.max_abs_diff == pytest.approx(float((merged - unmerged).abs().max()), abs=1e-7)
    assert report.max_abs_diff <= 1e-5 and report.mean_abs_diff <= report.max_abs_diff
    assert float((merged - base_forward(base_weights, x)).abs().max()) > 1e-4  # LoRA did something


def base_forward(base_weights: dict, x: torch.Tensor) -> torch.Tensor:
    plain = make_model()
    plain.load_state_dict({n.replace(".base.", "."): t for n, t in base_weights.items()})
    with torch.no_grad():
        return plain(x)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_update_rank_at_most_r(r):
    model = wrap_minigpt_with_lora(make_model(), r=r, seed=0)
    train_steps(model, steps=4)
    for _, layer in lora_layers(model):
        delta = layer.delta_weight().detach()  # fp32: rank tolerance follows fp32 eps
        assert delta.shape == (layer.out_features, layer.in_features)
        assert 1 <= int(torch.linalg.matrix_rank(delta)) <= r


# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize("r", [0, 1, 2, 4, 8, 16, 32])
def test_minigpt_lora_params_are_2304_r(r):
    model = wrap_minigpt_with_lora(make_model(), r=r)
    assert count_lora_params(model) == 2304 * r
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2304 * r
    table = lora_param_table(make_model(), r)
    assert table["totals"]["lora_params"] == 2304 * r and len(table["rows"]) == 12


def test_count_at_rank_8_and_per_block():
    model = wrap_minigpt_with_lora(make_model(), r=8)
    assert count_lora_params(model) == 18_432
    state = lora_state_dict(model)
    attn = sum(t.numel() for n, t in state.items() if n.startswith("blocks.0.attn."))
    ffn = sum(t.numel() for n, t in state.items() if n.startswith("blocks.0.mlp."))
    assert (attn, ffn) == (4096, 5120)


def test_lora_ratio_values():
    assert lora_ratio(64, 8) == 0.25
    assert lora_ratio(768, 8) == pytest.approx(0.0208, abs=1e-4)
    assert lora_ratio(4096, 8) == pytest.approx(0.0039, abs=1e-4)
    with pytest.raises(ValueError, match="h"):
        lora_ratio(0, 8)


def test_param_table_rows():
    table = lora_param_table(make_model(), 8)
    rows = {row["name"]: row for row in table["rows"]}
    q = rows["blocks.0.attn.q_proj"]
    assert (q["shape"], q["full_params"], q["lora_params"]) == ([64, 64], 4096, 1024)
    assert q["ratio"] == 0.25
    fc2 = rows["blocks.1.mlp.fc2"]
    assert (fc2["shape"], fc2["lora_params"]) == ([64, 256], 8 * 320)
    assert table["totals"]["full_params"] == 8 * 4096 + 4 * 16384
    assert table["totals"]["model_params"] == 103_680


# ----------------------------------------------------------------------------- rank 0


def test_rank_zero_is_a_valid_adapter_off_setting():
    model = make_model()
    x = tokens()
    with torch.no_grad():
        reference = model(x)
    wrap_minigpt_with_lora(model, r=0)
    layer = model.blocks[0].mlp.fc1
    assert layer.lora_A.shape == (0, 64) and layer.lora_B.shape == (256, 0)
    assert torch.equal(layer.lora_B @ layer.lora_A, torch.zeros(256, 64))
    assert torch.equal(layer.delta_weight(), torch.zeros(256, 64))
    assert layer.scaling == 0.0 and not math.isnan(layer.scaling)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, reference) and not torch.isnan(out).any()
    assert count_lora_params(model) == 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    with pytest.raises(ValueError, match="nothing is trainable.*rank 0"):
        build_optimizer(model)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        torch.optim.AdamW([])


# ----------------------------------------------------------------------------- init and args


def test_init_statistics():
    base = nn.Linear(4096, 8)
    stds = {}
    for init in ("gaussian", "gaussian_std"):
        layer = LoRALinear(base, r=16, init=init, generator=torch.Generator().manual_seed(0))
        assert layer.init == init and torch.equal(layer.lora_B, torch.zeros(8, 16))
        stds[init] = float(layer.lora_A.detach().std())
        assert abs(float(layer.lora_A.detach().mean())) < 0.01
    assert stds["gaussian"] == pytest.approx(1 / math.sqrt(16), rel=0.02)
    assert stds["gaussian_std"] == pytest.approx(1 / 16, rel=0.02)
    layer = LoRALinear(base, r=16, init="kaiming", generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(4096)
    assert float(layer.lora_A.detach().abs().max()) <= bound
    assert float(layer.lora_A.detach().abs().max()) > 0.99 * bound
    assert float(layer.lora_A.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    expected = torch.empty(16, 4096)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.lora_A.detach(), expected, rtol=0, atol=1e-7)


def test_seed_gives_identical_bytes_and_different_seeds_differ():
    def a_bytes(seed):
        model = wrap_minigpt_with_lora(make_model(), r=4, seed=seed)
        return torch.cat([m.lora_A.detach().flatten() for _, m in lora_layers(model)])

    assert torch.equal(a_bytes(123), a_bytes(123))
    assert not torch.equal(a_bytes(123), a_bytes(124))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"r": -1}, "r"), ({"r": 2.0}, "r"), ({"r": True}, "r"), ({"r": "8"}, "r"),
        ({"alpha": 0}, "alpha"), ({"alpha": -2.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        LoRALinear(nn.Linear(4, 4), **kwargs)
    model = make_model()
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        apply_lora(model, ["q_proj"], **kwargs)
    assert not lora_layers(model)


def test_unknown_init_lists_the_known_ones():
    with pytest.raises(ValueError, match="gaussian.*gaussian_std.*kaiming"):
        LoRALinear(nn.Linear(4, 4), init="normal")


def test_freeze_base_and_scaling():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=4, alpha=8.0)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.scaling == 2.0 and layer.merged is False and layer.disabled is False
    assert LoRALinear(nn.Linear(6, 5), r=4, alpha=8.0, use_rslora=True).scaling == 4.0
    kept = nn.Linear(6, 5)
    LoRALinear(kept, r=2, freeze_base=False)
    assert kept.weight.requires_grad


def test_forward_is_base_plus_scaled_update_and_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=6.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    layer.eval()
    expected = layer.base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # dropout is live in training
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), layer.base(x))  # dropout never touches the base path
    assert isinstance(LoRALinear(nn.Linear(6, 5), r=2).dropout, nn.Identity)


def test_low_precision_base_keeps_fp32_adapter_and_output_dtype():
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
    assert layer.lora_A.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- targeting


def test_suffix_matching_on_dot_boundaries():
    assert suffix_matches("blocks.0.attn.q_proj", "q_proj")
    assert suffix_matches("blocks.0.attn.q_proj", "attn.q_proj")
    assert suffix_matches("q_proj", "q_proj")
    assert not suffix_matches("blocks.0.attn.q_proj", "proj")
    assert not suffix_matches("blocks.0.attn.q_proj", "_proj")
    model = apply_lora(make_model(), ["attn.q_proj", "blocks.1.mlp.fc2"], r=2)
    assert [n for n, _ in lora_layers(model)] == [
        "blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "blocks.1.mlp.fc2"]
    assert count_lora_params(model) == 2 * 128 * 2 + 320 * 2


def test_target_matching_nothing_lists_linear_names_and_leaves_model_alone():
    model = make_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'proj' matches no Linear.*blocks\.0\.attn\.q_proj"):
        apply_lora(model, ["q_proj", "proj"])
    with pytest.raises(ValueError, match="non-Linear"):
        apply_lora(model, ["attn"])
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, "q_proj")


class TiedToy(nn.Module):
    """An embedding, two body Linears, a head tied to the embedding, and an lm_head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.tied_head = nn.Linear(8, 10, bias=False)
        self.tied_head.weight = self.emb.weight
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_all_linear_excludes_heads():
    assert [n for n, _ in lora_layers(apply_lora(TiedToy(), "all-linear", r=2))] == [
        "body.0", "body.1"]
    model = apply_lora(make_model(), "all-linear", r=8)
    assert count_lora_params(model) == 18_432
    assert model_lora_config(model).target_modules == "all-linear"


def test_rank_and_alpha_patterns_and_config_record():
    model = apply_lora(make_model(), list(MINIGPT_TARGETS), r=4, alpha=8.0,
                       rank_pattern={"fc1": 2}, alpha_pattern={"blocks.1.attn.q_proj": 3.0})
    assert model.blocks[0].mlp.fc1.r == 2 and model.blocks[1].mlp.fc1.r == 2
    assert model.blocks[0].mlp.fc2.r == 4
    assert model.blocks[1].attn.q_proj.scaling == 3.0 / 4
    assert model.blocks[0].attn.q_proj.scaling == 2.0
    assert model_lora_config(model).to_dict() == {
        "r": 4, "alpha": 8.0, "dropout": 0.0, "init": "gaussian", "use_rslora": False,
        "use_dora": False,
        "target_modules": list(MINIGPT_TARGETS), "rank_pattern": {"fc1": 2},
        "alpha_pattern": {"blocks.1.attn.q_proj": 3.0}, "seed": None,
        "exclude_modules": None, "layers_to_transform": None, "modules_to_save": None,
    }
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["q_proj"])


def test_generic_linear_like_base():
    class Scaled(nn.Module):
        in_features, out_features = 5, 3

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x[..., :3] * self.scale

    layer = LoRALinear(Scaled(), r=2)
    x = torch.randn(2, 5)
    assert torch.equal(layer(x), x[..., :3])
    with pytest.raises(ValueError, match="in_features"):
        LoRALinear(nn.LayerNorm(4))


# ----------------------------------------------------------------------------- disable / merge


def trained_model(r: int = 4) -> MiniGPT:
    model = wrap_minigpt_with_lora(make_model(), r=r, seed=0)
    train_steps(model, steps=3)
    return model.eval()


def test_disable_adapters_runs_base_and_restores():
    model = trained_model()
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
        base = base_forward({n: p for n, p in model.state_dict().items() if "lora_" not in n}, x)
        with disable_adapters(model):
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)
        with pytest.raises(RuntimeError), disable_adapters(model):
            raise RuntimeError("boom")
        assert torch.equal(model(x), adapted)
    assert not any(layer.disabled for _, layer in lora_layers(model))


def test_merge_twice_refused_unmerge_round_trip():
    model = trained_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    assert merge_lora(model).max_abs_diff is None
    assert all(layer.merged for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        disable_adapters(model).__enter__()
    assert unmerge_lora(model) == 12
    for name, param in model.named_parameters():
        if ".base." in name:
            assert (param - weights[name]).abs().max() <= 1e-6, name
    with pytest.raises(ValueError, match="no merged"):
        unmerge_lora(model)
    with pytest.raises(ValueError, match="target"):
        merge_lora(model, target="requantized")
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(make_model())


def test_merge_with_callable_probe():
    model = trained_model()
    x = tokens()
    report = merge_lora(model, probe=lambda m: m(x, x)[0])
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5


def test_merge_and_unload_gives_plain_model_with_same_outputs():
    model = trained_model()
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
    plain = merge_and_unload(model)
    assert plain is model and not lora_layers(plain) and model_lora_config(plain) is None
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(plain.blocks[0].attn, name)) is nn.Linear
    assert type(plain.blocks[1].mlp.fc1) is nn.Linear
    assert sorted(plain.state_dict()) == sorted(make_model().state_dict())
    with torch.no_grad():
        assert (plain(x) - adapted).abs().max() <= 1e-5


class HalfBase(nn.Module):
    """A base that declares FrozenBase itself: y = x W^T / 2, merging into a new Linear."""

    merge_targets = ("halved", "other")
    source_fan_in_fan_out = False

    def __init__(self):
        super().__init__()
        self.in_features = self.out_features = 4
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(4, 4, generator=generator))
        self.calls = []

    def compute_weight(self, dtype):
        return (self.weight / 2).to(dtype)

    def fused_state(self, x):
        return (self.weight,)

    def frozen_forward(self, x2d, state):
        self.calls.append("forward")
        return x2d @ (state[0] / 2).t()

    def frozen_input_grad(self, grad2d, state):
        self.calls.append("input_grad")
        return grad2d @ (state[0] / 2)

    def merged_with(self, lora_a, lora_b, scaling, target):
        self.calls.append(target)
        linear = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            linear.weight.copy_(self.weight / 2 + scaling * lora_b @ lora_a)
        return linear

    def forward(self, x):
        return x @ (self.weight / 2).t()


def test_a_declared_base_is_fused_and_merged_through_the_protocol():
    model = nn.Sequential(HalfBase())
    apply_lora(model, ["0"], r=2, seed=0)
    layer = model[0]
    assert isinstance(layer.base, FrozenBase) and frozen_base(layer.base) is layer.base
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 4, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert layer.base.calls == ["forward", "input_grad"]
    expected = x @ (layer.base.weight / 2 + layer.scaling * layer.lora_B @ layer.lora_A).t()
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="target must be one of"):
        merge_lora(model, target="float")
    report = merge_lora(model, probe=x.detach())
    assert report.target == "halved" and layer.base.__class__ is nn.Linear
    assert report.max_abs_diff <= 1e-5
    assert model_lora_config(model).r == 2
    plain = merge_and_unload(model)
    assert type(plain[0]) is nn.Linear and model_lora_config(plain) is None


def test_a_base_that_is_no_frozen_base_runs_unfused_and_refuses_merging():
    class Scaled(nn.Module):
        in_features, out_features = 4, 4

        def forward(self, x):
            return 2 * x

    model = apply_lora(nn.Sequential(Scaled()), ["0"], r=2)
    assert frozen_base(model[0].base) is None
    assert model(torch.ones(1, 4)).shape == (1, 4)
    with pytest.raises(ValueError, match="cannot merge into a Scaled base"):
        merge_lora(model)


def test_lora_config_survives_deepcopy_and_is_shared_by_the_layers():
    model = apply_lora(make_model(), ["q_proj", "fc1"], r=4, alpha=8.0, seed=3)
    config = model_lora_config(model)
    assert isinstance(config, LoRAConfig) and config.seed == 3
    copied = copy.deepcopy(model)
    copied_config = model_lora_config(copied)
    assert copied_config == config and copied_config is not config
    assert all(layer.config is copied_config for _, layer in lora_layers(copied))
    assert not any(hasattr(m, "lora_config") for m in (model, copied))


# ----------------------------------------------------------------------------- state dicts


def test_lora_state_dict_round_trip_and_checks():
    model = trained_model()
    state = lora_state_dict(model)
    assert len(state) == 24
    assert set(state) == {f"{n}.lora_{p}" for n, _ in lora_layers(model) for p in "AB"}
    assert state["blocks.0.mlp.fc1.lora_A"].shape == (4, 64)
    fresh = wrap_minigpt_with_lora(make_model(), r=4, seed=5)
    load_lora_state_dict(fresh, state)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    other = wrap_minigpt_with_lora(make_model(), r=2, seed=5)
    before = lora_state_dict(other)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other, state)
    bad = dict(state)
    bad.pop("blocks.0.mlp.fc1.lora_A")
    with pytest.raises(ValueError, match="missing.*blocks.0.mlp.fc1.lora_A"):
        load_lora_state_dict(fresh, bad)
    assert all(torch.equal(before[k], v) for k, v in lora_state_dict(other).items())


def test_bad_patterns_and_empty_selection_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="rank_pattern key"):
        apply_lora(model, ["q_proj"], rank_pattern={"fc1(": 2})
    with pytest.raises(ValueError, match=r"rank_pattern\['fc1'\] must"):
        apply_lora(model, ["q_proj"], rank_pattern={"fc1": -2})
    with pytest.raises(ValueError, match=r"alpha_pattern\['fc1'\] must"):
        apply_lora(model, ["q_proj"], alpha_pattern={"fc1": 0})
    with pytest.raises(ValueError, match="selects no Linear"):
        apply_lora(nn.Sequential(nn.ReLU()), "all-linear")
    assert not lora_layers(model)
