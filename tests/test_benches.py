"""The benches' setups are what the README tables say they are (demo counts, levels, settings)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("train_demos", [1, 9, 10, 500, 5000])
def test_babyai_imitation_trains_on_the_papers_number_of_training_demos(train_demos):
    """``--train-demos 5000`` is the BabyAI paper's count of *training* demos: the file holds more, so that the
    datamodule's split (every tenth episode to validation) leaves exactly that many for training."""
    from babyai_imitation import num_demos_for

    from toolkit.datamodules.episode_file import split_masks

    n = num_demos_for(train_demos)
    assert len(split_masks([str(i) for i in range(n)])["train"]) == train_demos
    assert len(split_masks([str(i) for i in range(n - 1)])["train"]) < train_demos  # no more than needed
    if train_demos == 5000:
        assert n == 5556


def test_babyai_imitation_variants_compose_to_the_settings_they_name(tmp_path):
    """Each variant's overrides give the train.py config its row claims (level, demos, chunk, shift, view, history,
    pixels or not, trunk)."""
    from babyai_imitation import VARIANTS, overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    pixels = None  # every camera in the file
    film = "toolkit.encoders.babyai_film.BabyAIViewFiLM"
    expected = {"chunk4_shift4": (4, 4, False, 2, pixels, "transformer", None),
                "h1_noaug": (1, 0, False, 2, pixels, "transformer", None),
                "h1_noaug_symbolic": (1, 0, True, 2, pixels, "transformer", None),
                "h1_noaug_symbolic_hist4": (1, 0, True, 4, pixels, "transformer", None),
                "symbolic_only": (1, 0, True, 2, ["state"], "transformer", None),
                "symbolic_only_gru64": (1, 0, True, 64, ["state"], "gru", None),
                "symbolic_only_film_gru64": (1, 0, True, 64, ["state"], "gru", film)}
    assert set(VARIANTS) == set(expected)
    for variant, (horizon, shift, symbolic, history, obs_keys, trunk, state_encoder) in expected.items():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides("GoToRedBall", 5000, 8000, 200, variant, 1))
        assert cfg.env.level == "GoToRedBall" and cfg.data.num_demos == 5556 and cfg.seed == 1
        assert (cfg.data.horizon, cfg.policy.augment_shift, cfg.env.symbolic) == (horizon, shift, symbolic)
        assert cfg.data.history == cfg.policy.history == history
        assert (None if cfg.data.obs_keys is None else list(cfg.data.obs_keys)) == obs_keys
        assert cfg.policy.trunk == trunk
        assert (cfg.policy.state_encoder or {}).get("_target_") == state_encoder
        assert cfg.trainer.max_steps == 8000 and cfg.callbacks.rollout.num_episodes == 200
        assert cfg.policy._target_.endswith("BCTransformer")


def test_the_babyai_film_experiment_is_the_benchs_99_percent_variant():
    """``experiment=babyai_film`` trains what the README's 99.5% row ran (bench variant symbolic_only_film_gru64)."""
    from babyai_imitation import overrides
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bench = compose("train", overrides=overrides("GoToRedBall", 5000, 4000, 200, "symbolic_only_film_gru64", 0))
        experiment = compose("train", overrides=["experiment=babyai_film"])
        linear = compose("train", overrides=["experiment=babyai_film", "~state_encoder"])
    for group in ("env", "data", "policy", "trainer"):
        assert experiment[group] == bench[group], group
    assert experiment.callbacks.rollout == bench.callbacks.rollout
    # the README's way back to the recipe without the view model (Hydra refuses state_encoder=null here)
    assert linear.policy.state_encoder is None and linear.data == experiment.data
