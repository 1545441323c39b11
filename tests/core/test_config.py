import pytest

from losparse import LoSparseConfig, LoSparseUsageError


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"remaining_ratio": 0.0}, "--remaining_ratio 0.0 is out of range"),
        ({"remaining_ratio": 1.5}, "--remaining_ratio 1.5 is out of range"),
        ({"low_rank_ratio": -0.1}, "--low_rank_ratio -0.1 is out of range"),
        ({"remaining_ratio": 0.1, "low_rank_ratio": 0.1}, "must be below --remaining_ratio"),
        ({"method": "magic"}, "--method 'magic' is not known"),
        ({"prune_dim": "diagonal"}, "--prune_dim 'diagonal' is not known"),
        ({"importance": "vibes"}, "--importance 'vibes' is not known"),
        ({"beta1": 1.0}, "--beta1 1.0 is out of range"),
        ({"pruning_warmup_ratio": 0.6, "pruning_final_ratio": 0.5}, "must be below 1"),
        ({"pruning_interval": 0}, "--pruning_interval 0 must be >= 1"),
        ({"pruning_final_steps": -3}, "--pruning_final_steps -3 must be >= 0"),
        ({"svd_solver": "qr"}, "--svd_solver 'qr' is not known"),
        ({"svd_device": "gpu0"}, "--svd_device 'gpu0' is not a device"),
        ({"svd_device": "meta"}, "--svd_device 'meta': only 'auto', 'cpu' and"),
    ],
)
def test_bad_values_are_rejected_with_the_value_named(kwargs, fragment):
    with pytest.raises(LoSparseUsageError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        LoSparseConfig(**kwargs)


def test_round_trip_through_dict():
    config = LoSparseConfig(remaining_ratio=0.15, low_rank_ratio=0.03, target_modules=["a.*"])
    assert LoSparseConfig.from_dict(config.to_dict()) == config


def test_pruning_variant():
    assert LoSparseConfig().pruning_variant == "paper"
    assert LoSparseConfig(pruning_variant="reference").pruning_variant == "reference"
    with pytest.raises(LoSparseUsageError, match="--pruning_variant 'platon' is not known; choose one of: paper, "
                                                 "reference"):
        LoSparseConfig(pruning_variant="platon")
    # configs recorded before the flag existed (checkpoints, saved models) read as the paper variant
    values = LoSparseConfig(pruning_variant="reference").to_dict()
    assert LoSparseConfig.from_dict(values).pruning_variant == "reference"
    values.pop("pruning_variant")
    assert LoSparseConfig.from_dict(values).pruning_variant == "paper"
