"""Recipes and overrides: every key checked, unknown keys named with the closest valid one."""

import glob
import os

import pytest

from src.config import OPTIONS, ConfigError, load_recipe, resolve, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_then_command_line(tmp_path):
    recipe = write(tmp_path, "model: dvt_tiny_deit\nlr: 0.01\nepochs: 5\nscale: [0.5, 1.0]\n")
    config, _ = resolve(["--config_path", recipe, "--lr", "1e-3", "--ema", "false", "--grids", "[2, 4]",
                         "--clip_grad", "null"], "t")
    assert config["model"] == "dvt_tiny_deit"
    assert config["epochs"] == 5
    assert config["lr"] == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1: must still be a float
    assert config["ema"] is False
    assert config["grids"] == [2, 4]
    assert config["scale"] == [0.5, 1.0]
    assert config["clip_grad"] is None
    assert config["batch_size"] == OPTIONS["batch_size"].default


def test_unknown_key_in_recipe_names_closest(tmp_path):
    recipe = write(tmp_path, "modle: dvt_tiny_t2t\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle' in .*recipe.yaml; did you mean 'model'"):
        resolve(["--config_path", recipe], "t")


def test_unknown_key_on_command_line_names_closest():
    with pytest.raises(ConfigError, match=r"'weight_decy' on the command line; did you mean 'weight_decay'"):
        resolve(["--weight_decy", "0.1"], "t")


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "ten", "epochs: expected int"),
    ("epochs", "2.5", "epochs: expected int"),
    ("ema", "maybe", "ema: expected true or false"),
    ("amp_level", "O4", "amp_level: 'O4' is not one of"),
    ("epochs", "null", "epochs cannot be null"),
    ("log_interval", "0", "log_interval: 0 is below its minimum 1"),
    ("eval_interval", "-1", "eval_interval: -1 is below its minimum 0"),
    ("save_interval_steps", "0", "save_interval_steps: 0 is below its minimum 1"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve([f"--{key}", value], "t")


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "lr: [1, 2\n"))
    with pytest.raises(ConfigError, match=f"^config path {tmp_path} is a directory: give a YAML recipe file"):
        resolve(["--config_path", str(tmp_path)], "t")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"{binary}"):
        load_recipe(str(binary))


def test_resolved_config_round_trips(tmp_path):
    config, _ = resolve(["--lr", "0.5"], "t")
    path = str(tmp_path / "config.yaml")
    save_config(config, path)
    again, _ = resolve(["--config_path", path], "t")
    assert again == config
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_a_failed_config_write_keeps_the_old_file(tmp_path, monkeypatch):
    from src import atomic
    from src.atomic import WriteFailed

    path = tmp_path / "config.yaml"
    path.write_text("lr: 0.5\n")

    def full_disk(tmp):  # the temp file is written, then flushing it to disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "_sync", full_disk)
    with pytest.raises(WriteFailed, match=f"^cannot write {path}: \\[Errno 28\\] No space left on device$"):
        save_config(resolve([], "t")[0], str(path))
    assert path.read_text() == "lr: 0.5\n" and os.listdir(tmp_path) == ["config.yaml"]


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "config", "*.yaml"))))
def test_shipped_recipes_are_valid(recipe):
    from src.models import model_spec

    config, _ = resolve(["--config_path", recipe], "t")
    # The recipe's model at its classes, image size and grids, as training builds it: grids that do not fit
    # the image size, or a model name the registry lacks, fail here.
    overrides = {key: config[key] for key in ("img_size", "grids") if config[key] is not None}
    model_spec(config["model"], num_classes=config["num_classes"], **overrides)
