"""The miniature world's arms table (reward_forcing/miniworld/experiment.py): an arm is one declarative entry of
configs/miniworld/experiment.yaml, read with its defaults, checked with one-line errors, and its update points
become train.py's max_steps through the stage config's generator-update ratio."""
import pytest
from omegaconf import OmegaConf

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.experiment import Run, arms_of, experiment_settings


def _settings(arms: dict, seeds=(1, 2, 3)):
    return OmegaConf.create({"seeds": list(seeds), "arms": arms})


def test_an_arm_is_one_entry_with_defaults():
    arms = arms_of(_settings({"mine": {"overrides": ["distill_loss=dmd"], "updates": [10, 30]},
                              "other": {"stage": "reward_feedback", "init": "ode_init", "updates": [5],
                                        "seeds": [7], "label": "Other arm"}}))
    mine, other = arms["mine"], arms["other"]
    assert (mine.stage, mine.init, mine.seeds, mine.label) == ("distill", "ode_init", (1, 2, 3), "mine")
    assert mine.overrides == ("distill_loss=dmd",) and mine.updates == (10, 30)
    assert [mine.row(n) for n in mine.updates] == ["mine@10", "mine@30"]
    assert (other.stage, other.seeds, other.label) == ("reward_feedback", (7,), "Other arm")


@pytest.mark.parametrize("entry, message", [
    ({"updates": [10], "stages": "distill"}, "arm 'a' has unknown key(s) stages"),
    ({"overrides": []}, "arm 'a' needs a name without '@' and a non-empty updates list"),
    ({"updates": [30, 10]}, "arm 'a': updates must be increasing positive counts, got [30, 10]"),
    ({"updates": [0]}, "arm 'a': updates must be increasing positive counts, got [0]"),
])
def test_bad_arms_are_one_line_errors(entry, message):
    with pytest.raises(ConfigError) as err:
        arms_of(_settings({"a": entry}))
    assert str(err.value).startswith(message)


def test_the_committed_experiment_declares_every_claims_arm():
    settings = experiment_settings(quick=False)
    arms = arms_of(settings)
    assert {"dmd", "re_dmd", "re_dmd_bm", "dmd_detached", "rf_last", "rf_random"} <= set(arms)
    for name in ("dmd", "re_dmd", "re_dmd_bm", "cf_dmd", "cf_re_dmd_b4", "dmd_ff"):  # read by a claim at its points
        assert settings.claim_updates[0] in arms[name].updates and len(arms[name].seeds) >= 3
    assert arms["cf_dmd"].init == arms["cf_re_dmd_b4"].init == "cf_ode_init"
    assert "reward.beta=4.0" in arms["cf_re_dmd_b4"].overrides


def test_update_points_become_max_steps_through_the_generator_update_ratio(tmp_path):
    settings = experiment_settings(quick=False)
    run = Run(tmp_path, settings, "latent_motion", quick=False)
    # configs/miniworld/distill.yaml: the generator steps on every 5th step (dfake_gen_update_ratio 5)
    assert run.max_steps(run.arms["dmd"], 40) == 200 and run.max_steps(run.arms["dmd"], 160) == 800
    # reward feedback has no critic: every step is a generator update
    assert run.max_steps(run.arms["rf_last"], 60) == 60
    # the causal ODE init (stage cf_ode_init) is an init the cf_ arms start from
    assert run.weights("cf_ode_init") == tmp_path / "cf_ode_init" / "ode_init.pt"
    assert run.arm_command(run.arms["cf_dmd"], 1)[1][-2] == f"generator_ckpt={tmp_path / 'cf_ode_init' / 'ode_init.pt'}"
    with pytest.raises(ConfigError, match="unknown init 'ar_teacher' \\(ode_init, cf_ode_init\\)"):
        run.weights("ar_teacher")


def test_distill_arms_read_first_frames_from_the_teachers_ode_pairs(tmp_path):
    settings = experiment_settings(quick=False)
    run = Run(tmp_path, settings, "latent_motion", quick=False)
    assert run.arms["dmd_ff"].overrides == ("distill_loss=dmd", "first_frame_prob=0.5")
    assert set(settings.image.arms) <= set(run.arms) and "dmd_ff" in settings.image.arms
    for name in ("dmd", "dmd_ff"):
        assert f"data_path={tmp_path / 'ode_pairs'}" in run.arm_command(run.arms[name], seed=1)[1]
    # reward feedback samples from prompts alone: no ODE pairs
    assert not any(o.startswith("data_path=") for o in run.arm_command(run.arms["rf_last"], seed=1)[1])
