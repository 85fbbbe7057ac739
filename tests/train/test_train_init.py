"""train.init_from / init_stage: fine-tuning starts from a run's or a cascade stage's weights."""
import pytest
import torch

pytest.importorskip("PIL")

from support.training import TINY_MODEL, tiny_run  # noqa: E402

from imagen_fast import checkpoint as ck  # noqa: E402
from imagen_fast.export import cascade_from_runs  # noqa: E402
from imagen_fast.train import Trainer  # noqa: E402
from imagen_fast.train_config import ConfigError, config_from_dict  # noqa: E402


def _raw(out_dir, steps=3, **train):
    return tiny_run(out_dir, steps, **dict({"seed": 5}, **train))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("init") / "source"
    Trainer(config_from_dict(_raw(run))).run()
    data = ck.load_checkpoint(ck.latest_checkpoint(run / "checkpoints"))
    return run, data


def _assert_weights(model, expected):
    own = model.state_dict()
    assert set(own) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(own[k], v.to(own[k].dtype), rtol=0, atol=0, msg=k)


def test_init_from_a_run_loads_its_ema_weights_and_starts_at_step_zero(trained, tmp_path):
    run, data = trained
    ema = dict(data["model"], **data["ema"])
    assert any(not torch.equal(ema[k], data["model"][k]) for k in data["ema"])
    fresh = Trainer(config_from_dict(_raw(tmp_path / "plain"))).model.state_dict()
    assert any(not torch.equal(fresh[k], ema[k]) for k in ema)   # a random start differs
    tuned = Trainer(config_from_dict(_raw(tmp_path / "tuned", init_from=str(run))))
    assert tuned.step == 0
    _assert_weights(tuned.model, ema)
    # the EMA starts from the loaded weights, not the random ones
    _assert_weights(tuned.model, {k: v for k, v in tuned.ema.full_state().items()})
    # a step directory works too, and training from there runs
    step_dir = ck.latest_checkpoint(run / "checkpoints")
    summary = Trainer(config_from_dict(_raw(tmp_path / "tuned2", steps=2,
                                            init_from=str(step_dir)))).run()
    assert summary["step"] == 2


def test_init_from_a_cascade_stage(trained, tmp_path):
    run, data = trained
    cascade, _ = cascade_from_runs([run], names=["tiny"])
    cascade.save(str(tmp_path / "cascade"), dtype=torch.float32)
    tuned = Trainer(config_from_dict(_raw(tmp_path / "tuned", init_from=str(tmp_path / "cascade"),
                                          init_stage="tiny")))
    _assert_weights(tuned.model, dict(data["model"], **data["ema"]))
    with pytest.raises(ValueError, match="init_stage='other' is not a stage.*tiny"):
        Trainer(config_from_dict(_raw(tmp_path / "x", init_from=str(tmp_path / "cascade"),
                                      init_stage="other")))


def test_init_from_refuses_other_models_and_bad_paths(trained, tmp_path):
    run, _ = trained
    raw = _raw(tmp_path / "x", init_from=str(run))
    raw["model"] = {"preset": "tiny-base32", "overrides": dict(TINY_MODEL["overrides"], model_channels=8)}
    with pytest.raises(ck.CheckpointError, match="another U-Net"):
        Trainer(config_from_dict(raw))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        Trainer(config_from_dict(_raw(tmp_path / "y", init_from=str(tmp_path / "nothing"))))
    with pytest.raises(ValueError, match="init_stage is for a cascade"):
        Trainer(config_from_dict(_raw(tmp_path / "z", init_from=str(run), init_stage="tiny")))
    with pytest.raises(ConfigError, match="train.init_stage needs train.init_from"):
        config_from_dict(_raw(tmp_path / "w", init_stage="tiny"))
