import json

import pytest

from training.config import Config, ConfigError, build_config, load_file, save_config, set_value


def test_documented_defaults():
    c = Config()
    assert (c.model.max_k, c.model.temperature) == (16, 0.1)
    assert c.data.patch_sizes == (256, 512, 1024) and c.data.patch_size == 512
    assert c.data.source == "synthetic" and c.data.require_slic is True
    assert c.autoencoder.enabled is True and c.autoencoder.lambda_recon == 1.0
    assert (c.student.embed_dim, c.student.depth, c.student.norm) == (96, 3, "group")
    assert c.knobs.k_choices == (2, 4, 8, 16) and c.train.seed == 42


def test_set_overrides_are_coerced():
    c = build_config(None, ["data.patch_sizes=128,256", "train.amp=true", "train.lr=3e-4", "train.steps=7"])
    assert c.data.patch_sizes == (128, 256)
    assert c.train.amp is True and c.train.lr == pytest.approx(3e-4) and c.train.steps == 7


@pytest.mark.parametrize("override, needle", [
    ("train.nope=1", "train.nope"),
    ("nosection.x=1", "nosection"),
    ("train.steps=abc", "train.steps"),
    ("train.amp=maybe", "train.amp"),
    ("data.source=satellite", "data.source"),
    ("model.max_k=17", "model.max_k"),
    ("knobs.k_choices=1,4", "knobs.k_choices"),
    ("data.patch_sizes=250", "data.patch_sizes"),
    ("model.embed_dim=8", "model.embed_dim"),   # an older config's second embedding width must agree
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config(None, [override])


def test_one_embedding_width_older_configs_still_load():
    """student.embed_dim is the one setting; model.embed_dim (older configs) is accepted when it agrees."""
    c = build_config(None, ["student.embed_dim=8", "model.embed_dim=8"])
    assert c.student.embed_dim == 8 and "embed_dim" not in c.to_dict()["model"]
    assert build_config(None, ["student.embed_dim=8"]).student.embed_dim == 8


def test_yaml_merge_coerces_lists_to_tuples(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  patch_sizes: [64, 128]\ntrain:\n  steps: 5\n")
    c = build_config(str(f))
    assert c.data.patch_sizes == (64, 128) and c.train.steps == 5


def test_yaml_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        build_config(str(f))


def test_python_config_get_config_and_constant(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("def get_config():\n    return {'train': {'steps': 11}}\n")
    assert build_config(str(f)).train.steps == 11
    g = tmp_path / "b.py"
    g.write_text("from training.config import Config\nCONFIG = Config()\nCONFIG.train.seed = 5\n")
    assert build_config(str(g)).train.seed == 5
    h = tmp_path / "c.py"
    h.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        build_config(str(h))


def test_saved_config_round_trips(tmp_path):
    c = build_config(None, ["train.steps=9", "data.patch_sizes=64"])
    save_config(c, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 9
    again = load_file(tmp_path / "config.json")
    assert again.to_dict() == c.to_dict()


def test_set_value_rejects_non_dotted():
    with pytest.raises(ConfigError, match="section.field"):
        set_value(Config(), "steps", 3)
