import pytest

from imagen_fast.train_config import ConfigError, config_from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "cfg.toml"
    p.write_text('[data]\npath = "data"\n[train]\nsteps = 5\nlr = 3e-4\n')
    cfg = load_config(p, ["train.batch_size=8", "log.out_dir=runs/x", "train.betas=[0.9, 0.99]"])
    assert cfg.train.steps == 5 and cfg.train.lr == 3e-4 and cfg.train.batch_size == 8
    assert cfg.log.out_dir == "runs/x" and cfg.train.betas == [0.9, 0.99]


@pytest.mark.parametrize("raw,words", [
    ({"trian": {}}, "unknown section [trian]"),
    ({"data": {"path": "d"}, "train": {"lerning_rate": 1.0}}, "unknown key train.lerning_rate"),
    ({"data": {"path": "d"}, "train": {"lr": -1.0}}, "train.lr must be > 0"),
    ({"data": {"path": "d"}, "train": {"steps": "ten"}}, "train.steps must be an integer"),
    ({"data": {"path": "d"}, "train": {"precision": "fp8"}}, "train.precision must be"),
    ({"data": {"path": "d"}, "train": {"batch_size": 6, "grad_accum": 4}}, "train.batch_size must be divisible"),
    ({"data": {"path": "d", "kind": "lmdb"}}, "data.kind must be"),
    ({"data": {}}, "data.path must name the dataset directory"),
    ({"data": {"path": "d"}, "model": {"preset": "huge"}}, "model.preset must be one of"),
    ({"data": {"path": "d"}, "train": {"compile": "yes"}}, "train.compile must be true or false"),
    ({"data": {"path": "d"}, "distributed": {"strategy": "zero3"}}, "distributed.strategy must be"),
])
def test_bad_config_names_the_key(raw, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert words in str(e.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
