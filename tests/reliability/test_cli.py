"""The command line on user errors: one ``fxlens: error: ...`` line, no traceback, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import transformers

from fxlens.cli import main
from tests.lenses.lens_helpers import tiny_lm_dir, write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder with tokenizer, folder of .txt files): a 3-layer Llama."""
    root = tmp_path_factory.mktemp("cli")
    texts = write_corpus(root / "text", n_files=1, words=300)
    return tiny_lm_dir(root / "model", texts), root / "text"


def _user_error(capsys, argv) -> str:
    """Run ``main(argv)``, check it is a one-line user error with status 2, return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "UserWarning" not in line
             and "warnings.warn" not in line]
    assert "Traceback" not in err and lines[-1].startswith("fxlens: error: ")
    return lines[-1]


def _argparse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _eval(tiny, tmp_path, *extra):
    model, text = tiny
    return ["lens", "eval", "--model", str(model), "--text", str(text), "--out", str(tmp_path / "ev"),
            "--seq-len", "8", *extra]


def test_sites_missing_folder(capsys, tmp_path):
    line = _user_error(capsys, ["sites", str(tmp_path / "nope")])
    assert f"no such folder: {tmp_path / 'nope'}" in line


def test_sites_block_out_of_range(tiny, capsys):
    line = _user_error(capsys, ["sites", str(tiny[0]), "--block", "99"])
    assert "--block 99 is out of range: the model has 3 blocks (give 0 to 2)" in line


def test_sites_negative_block(tiny, capsys):
    line = _user_error(capsys, ["sites", str(tiny[0]), "--block", "-1"])
    assert "--block -1 is out of range" in line


def test_sites_block_in_range_shows_only_that_block(tiny, capsys):
    assert main(["sites", str(tiny[0]), "--block", "1"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert any(n.startswith("blocks.1.") for n in names)
    assert not any(n.startswith(("blocks.0.", "blocks.2.")) for n in names)


def test_sites_unsupported_model(capsys, tmp_path):
    cfg = transformers.AutoConfig.for_model("mamba", hidden_size=16, num_hidden_layers=1, state_size=4,
                                            vocab_size=32)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mamba")
    line = _user_error(capsys, ["sites", str(tmp_path / "mamba")])
    assert "unsupported: state-space layers have no attention sites" in line


def test_unknown_offline_model(capsys):
    line = _user_error(capsys, ["sites", "offline:nope"])
    assert "unknown offline model 'nope'; known: ['minilm', 'smollm2']" in line


def test_eval_micro_batch_zero(tiny, tmp_path, capsys):
    line = _argparse_error(capsys, _eval(tiny, tmp_path, "--micro-batch", "0"))
    assert "argument --micro-batch: must be at least 1, not 0" in line


def test_eval_micro_batch_not_an_integer(tiny, tmp_path, capsys):
    line = _argparse_error(capsys, _eval(tiny, tmp_path, "--micro-batch", "two"))
    assert "argument --micro-batch: 'two' is not an integer" in line


def test_eval_seq_len_zero(tiny, tmp_path, capsys):
    line = _argparse_error(capsys, _eval(tiny, tmp_path, "--seq-len", "0"))
    assert "argument --seq-len: must be at least 1, not 0" in line


def test_eval_seq_len_one(tiny, tmp_path, capsys):
    line = _user_error(capsys, _eval(tiny, tmp_path, "--seq-len", "1"))
    assert "seq_len must be at least 2" in line


def test_eval_max_chunks_zero(tiny, tmp_path, capsys):
    line = _argparse_error(capsys, _eval(tiny, tmp_path, "--max-chunks", "0"))
    assert "argument --max-chunks: must be at least 1" in line


def test_eval_non_utf8_text_names_the_file(tiny, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Emma Woodhouse, handsome, clever, and rich \xe9t\xe9 ".encode("latin-1") * 20)
    model, _ = tiny
    line = _user_error(capsys, ["lens", "eval", "--model", str(model), "--text", str(bad), "--out",
                                str(tmp_path / "ev"), "--seq-len", "8"])
    assert f"{bad} is not UTF-8 text" in line and "iconv" in line


def test_eval_missing_text(tiny, tmp_path, capsys):
    model, _ = tiny
    line = _user_error(capsys, ["lens", "eval", "--model", str(model), "--text", str(tmp_path / "none.txt"),
                                "--out", str(tmp_path / "ev")])
    assert f"text source {tmp_path / 'none.txt'} does not exist" in line


def test_eval_missing_lens_folder(tiny, tmp_path, capsys):
    line = _user_error(capsys, _eval(tiny, tmp_path, "--lens", str(tmp_path / "nolens")))
    assert f"{tmp_path / 'nolens'} is not a lens folder: no config.json" in line


def test_train_steps_zero(tiny, tmp_path, capsys):
    model, text = tiny
    line = _user_error(capsys, ["lens", "train", "--model", str(model), "--text", str(text), "--out",
                                str(tmp_path / "l"), "--steps", "0"])
    assert "TrainConfig.steps must be an integer >= 1, not 0 (--steps)" in line


def test_train_micro_batch_zero(tiny, tmp_path, capsys):
    model, text = tiny
    line = _user_error(capsys, ["lens", "train", "--model", str(model), "--text", str(text), "--out",
                                str(tmp_path / "l"), "--micro-batch", "0"])
    assert "TrainConfig.micro_batch must be an integer >= 1, not 0" in line


def test_plot_nothing_to_plot(tmp_path, capsys):
    line = _user_error(capsys, ["lens", "plot", "--out", str(tmp_path)])
    assert "nothing to plot: give --eval eval.json" in line


def test_plot_prompt_without_model(tmp_path, capsys):
    line = _user_error(capsys, ["lens", "plot", "--out", str(tmp_path), "--prompt", "hi"])
    assert "--prompt needs --model" in line


def test_plot_layer_stride_zero(tmp_path, capsys):
    line = _argparse_error(capsys, ["lens", "plot", "--out", str(tmp_path), "--layer-stride", "0"])
    assert "argument --layer-stride: must be at least 1, not 0" in line


def test_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FXLENS_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["sites", str(tmp_path / "nope")])


def test_subprocess_prints_one_line_and_exits_2(tmp_path):
    """End to end: the real entry point, as a shell user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "FXLENS_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "fxlens.cli", "sites", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"fxlens: error: no such folder: {tmp_path / 'nope'} (give an existing "
                                             "model folder, a .gguf file, or a hub name such as "
                                             "'HuggingFaceTB/SmolLM2-135M')"]


def test_device_not_a_device(tiny, capsys):
    line = _user_error(capsys, ["sites", str(tiny[0]), "--device", "gpu0"])
    assert "--device 'gpu0' is not a device" in line and "use cpu, cuda or cuda:N" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny, capsys):
    line = _user_error(capsys, ["sites", str(tiny[0]), "--device", "cuda"])
    assert "--device cuda: this machine has 0 CUDA devices; use --device cpu" in line


def test_missing_gguf_file(tmp_path, capsys):
    line = _user_error(capsys, ["sites", str(tmp_path / "model.gguf")])
    assert f"no such file: {tmp_path / 'model.gguf'}" in line


def test_explore_port_out_of_range(capsys):
    line = _argparse_error(capsys, ["explore", "--model", "offline:smollm2", "--port", "70000"])
    assert "argument --port: must be a port number from 1 to 65535, not 70000" in line


def _no_server(monkeypatch):
    import fxlens.explorer.launch as launch

    monkeypatch.setattr(launch, "run_child", lambda cmd: pytest.fail(f"the server was started: {cmd}"))


def test_explore_missing_model_folder_before_the_server_starts(tmp_path, capsys, monkeypatch):
    _no_server(monkeypatch)
    line = _user_error(capsys, ["explore", "--model", str(tmp_path / "nope")])
    assert f"no such folder: {tmp_path / 'nope'}" in line


def test_explore_missing_lens_before_the_server_starts(tiny, tmp_path, capsys, monkeypatch):
    _no_server(monkeypatch)
    line = _user_error(capsys, ["explore", "--model", str(tiny[0]), "--lens", str(tmp_path / "nolens")])
    assert f"{tmp_path / 'nolens'} is not a lens folder: no config.json" in line


def test_eval_model_without_tokenizer(tmp_path, capsys):
    from tests.conftest import tiny_hf

    tiny_hf("llama").save_pretrained(tmp_path / "m")
    text = write_corpus(tmp_path / "text", n_files=1, words=50)[0]
    line = _user_error(capsys, ["lens", "eval", "--model", str(tmp_path / "m"), "--text", str(text), "--out",
                                str(tmp_path / "ev")])
    assert "tokenising text needs the model's tokenizer; this model has none" in line
