"""Broken or ill-typed lens folders: each is refused with an error naming the file and the fault."""

from __future__ import annotations

import json

import pytest
import torch

from fxlens.lenses import TunedLens, load_lens
from tests.conftest import traced


@pytest.fixture
def lens_dir(tmp_path):
    """A valid fxlens-format lens folder for the tiny Llama."""
    TunedLens(traced("llama")).save(tmp_path / "lens")
    return tmp_path / "lens"


def _config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(file, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_truncated_params_pt_is_not_called_pickled_code(tmp_path):
    m = traced("llama")
    TunedLens(m).save(tmp_path, format="tuned-lens")
    _truncate(tmp_path / "params.pt")
    with pytest.raises(ValueError, match="params.pt cannot be read") as e:
        load_lens(m, tmp_path)
    assert "truncated or corrupted" in str(e.value) and "pickled code" not in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_empty_params_pt(tmp_path):
    m = traced("llama")
    TunedLens(m).save(tmp_path, format="tuned-lens")
    (tmp_path / "params.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"params\.pt cannot be read .*truncated or corrupted"):
        load_lens(m, tmp_path)


def test_garbage_params_pt_is_not_called_pickled_code(tmp_path):
    m = traced("llama")
    TunedLens(m).save(tmp_path, format="tuned-lens")
    (tmp_path / "params.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"params\.pt cannot be read") as e:
        load_lens(m, tmp_path)
    assert "pickled code" not in str(e.value)


def test_truncated_safetensors_names_the_file(lens_dir):
    _truncate(lens_dir / "params.safetensors")
    with pytest.raises(ValueError, match=r"params\.safetensors cannot be read .*truncated or corrupted") as e:
        load_lens(traced("llama"), lens_dir)
    assert str(lens_dir) in str(e.value)


def test_config_is_a_json_list(lens_dir):
    (lens_dir / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"config\.json: a lens config is a JSON object of settings, not a list"):
        load_lens(traced("llama"), lens_dir)


def test_config_not_json_names_the_file(lens_dir):
    (lens_dir / "config.json").write_text("d_model = 32\n")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON") as e:
        load_lens(traced("llama"), lens_dir)
    assert str(lens_dir / "config.json") in str(e.value)


def test_truncated_config_names_the_file(lens_dir):
    _truncate(lens_dir / "config.json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*truncated or corrupted"):
        load_lens(traced("llama"), lens_dir)


def test_config_not_utf8_names_the_file(lens_dir):
    (lens_dir / "config.json").write_bytes(b'{"d_model": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_lens(traced("llama"), lens_dir)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("d_model", "64", "'d_model' must be a positive integer"),
    ("d_model", 32.0, "'d_model' must be a positive integer"),
    ("d_model", True, "'d_model' must be a positive integer"),
    ("d_model", 0, "'d_model' must be a positive integer"),
    ("num_hidden_layers", 2.0, "'num_hidden_layers' must be a positive integer"),
    ("num_hidden_layers", 2.5, "'num_hidden_layers' must be a positive integer"),
    ("num_hidden_layers", -1, "'num_hidden_layers' must be a positive integer"),
    ("num_hidden_layers", None, "'num_hidden_layers' must be a positive integer"),
    ("bias", "no", "'bias' must be true or false"),
    ("bias", 0, "'bias' must be true or false"),
    ("base_model_name_or_path", 5, "'base_model_name_or_path' must be a string"),
    ("unembed_hash", 12, "'unembed_hash' must be a string or null"),
])
def test_config_field_types_are_checked(lens_dir, field, value, words):
    _config(lens_dir, **{field: value})
    with pytest.raises(ValueError, match="lens config field") as e:
        load_lens(traced("llama"), lens_dir)
    assert words in str(e.value) and repr(value) in str(e.value) and str(lens_dir / "config.json") in str(e.value)


def test_bias_false_string_does_not_load_a_bias(lens_dir):
    """'"bias": "no"' used to be truthy: the lens grew biases the file never said it had."""
    _config(lens_dir, bias="false")
    with pytest.raises(ValueError, match="'bias' must be true or false .*not 'false'"):
        load_lens(traced("llama"), lens_dir)


def test_weights_for_another_layer_count(tmp_path):
    """config.json and the weights disagree: a clear error naming the folder, not a state_dict dump."""
    m = traced("llama")
    TunedLens(m).save(tmp_path)
    state = {"0.weight": torch.zeros(m.cfg.d_model, m.cfg.d_model), "0.bias": torch.zeros(m.cfg.d_model)}
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "params.safetensors"))
    with pytest.raises(ValueError, match="do not match its config.json") as e:
        load_lens(m, tmp_path)
    assert str(tmp_path) in str(e.value) and "1.weight" in str(e.value)


def test_valid_lens_still_loads_exactly(lens_dir):
    m = traced("llama")
    lens = TunedLens(m)
    with torch.no_grad():
        for p in lens.layer_translators.parameters():
            p.normal_()
    lens.save(lens_dir)
    back = load_lens(m, lens_dir)
    for a, b in zip(lens.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_truncated_training_checkpoint_names_the_file(tmp_path):
    from fxlens.lenses import TokenChunks, TrainConfig, train_lens

    m = traced("llama")
    chunks = TokenChunks(torch.randint(3, 100, (4, 8)), torch.full((4,), 7), ["x.txt"])
    cfg = TrainConfig(steps=2, batch_size=2, micro_batch=2, checkpoint_every=1, progress=False)
    train_lens(m, chunks, cfg, out=tmp_path)
    _truncate(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint .*checkpoint.pt cannot be read .*delete it to train from") as e:
        train_lens(m, chunks, cfg, out=tmp_path, resume=True)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", ['{"layers": [0, 1], "metr', "[1, 2]", '{"layers": [0]}'])
def test_broken_eval_json_names_the_file(tmp_path, content):
    from fxlens.lenses import LensEval

    (tmp_path / "eval.json").write_text(content)
    with pytest.raises(ValueError, match="eval.json is not an eval.json written by `fxlens lens eval`") as e:
        LensEval.load(tmp_path / "eval.json")
    assert str(tmp_path / "eval.json") in str(e.value)
