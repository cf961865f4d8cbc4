"""Typed settings (util/config.py) and the one FinetuneConfig of every model kind."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from minituner.training.config import FinetuneConfig, kind_defaults, model_kind
from minituner.util.config import from_dict, merge_settings


@dataclass
class Settings:
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    names: list | None = None
    limit: int | None = None


def test_values_are_checked_against_the_annotations():
    made = from_dict(Settings, {"count": "3", "rate": "1e-3", "names": ("a", "b"), "limit": None,
                                "flag": True}, "test")
    assert (made.count, made.rate, made.names, made.flag) == (3, 0.001, ["a", "b"], True)
    assert type(made.rate) is float and from_dict(Settings, {"rate": 2}, "t").rate == 2.0
    bad = [({"count": True}, "'count' must be an integer, got True"),
           ({"rate": False}, "'rate' must be a number, got False"),
           ({"count": "2.5"}, "'count' must be an integer, got '2.5'"),
           ({"count": None}, "'count' must be an integer, got None"),
           ({"flag": "yes"}, "'flag' must be true or false"),
           ({"names": ["a", 1]}, "'names' must be a list of strings or null"),
           ({"name": 3}, "'name' must be a string, got 3")]
    for values, message in bad:
        with pytest.raises(ValueError, match=f"^test: {message}"):
            from_dict(Settings, values, "test")


def test_unknown_keys_are_listed_with_the_known_ones():
    with pytest.raises(ValueError) as info:
        from_dict(Settings, {"cuont": 1, "zz": 2}, "config file a.yaml")
    assert str(info.value) == ("config file a.yaml: unknown key(s) ['cuont', 'zz']; known keys: "
                               "['count', 'flag', 'limit', 'name', 'names', 'rate']")


def test_precedence_defaults_then_file_then_flags():
    defaults = {"steps": 100, "epochs": None, "lr": 1.0, "rank": 8}
    merged = merge_settings(defaults, {"lr": 2.0, "rank": 4}, {"rank": 2},
                            exclusive=[("steps", "epochs")])
    assert merged == {"steps": 100, "epochs": None, "lr": 2.0, "rank": 2}
    from_file = merge_settings(defaults, {"epochs": 2.0}, {}, exclusive=[("steps", "epochs")])
    assert (from_file["steps"], from_file["epochs"]) == (None, 2.0)
    flag_wins = merge_settings(defaults, {"epochs": 2.0}, {"steps": 5},
                               exclusive=[("steps", "epochs")])
    assert (flag_wins["steps"], flag_wins["epochs"]) == (5, None)


def test_each_model_kind_keeps_its_defaults():
    assert model_kind("hf:some/dir") == "hf" and model_kind("runs/base") == "minigpt"
    assert model_kind(None) == "minigpt"
    mini, hf = kind_defaults("minigpt"), kind_defaults("hf")
    assert (mini["steps"], mini["lr"], mini["batch_size"], mini["dropout"]) == (600, 1e-2, 32, 0.2)
    assert (mini["replay"], mini["kl"], mini["checkpoint_every"]) == (0.5, 3.0, 50)
    assert (hf["steps"], hf["lr"], hf["batch_size"], hf["dropout"]) == (100, 2e-4, 8, 0.0)
    assert (hf["replay"], hf["kl"], hf["checkpoint_every"]) == (0.0, 0.0, 25)
    assert FinetuneConfig().to_dict() == {**mini, "steps": None}  # code keeps Mini-GPT's
    assert FinetuneConfig.for_kind("hf", model="hf:m").validate().kind == "hf"


@pytest.mark.parametrize("kind, values, message", [
    ("hf", {"replay": 0.5}, "--replay cannot be used with transformers (hf:) models"),
    ("hf", {"kl": 1.0, "replay": 0.0}, "--kl cannot be used with transformers (hf:) models"),
    ("hf", {"method": "full"},
     "--method must be one of ['lora', 'qlora', 'dora', 'qdora'] for transformers"),
    ("hf", {"dropout": 1.5}, "--dropout must be a fraction in [0, 1), got 1.5"),
    ("minigpt", {"max_len": 8}, "--max-len cannot be used with Mini-GPT models"),
    ("minigpt", {"chat_template": True}, "--chat-template cannot be used with Mini-GPT models"),
    ("minigpt", {"threads": 0}, "--threads must be a positive int, got 0"),
])
def test_settings_a_kind_refuses_are_named(kind, values, message):
    model = "hf:m" if kind == "hf" else "runs/base"
    with pytest.raises(ValueError) as info:
        FinetuneConfig.for_kind(kind, model=model, **values).validate()
    assert message in str(info.value) and "\n" not in str(info.value)
