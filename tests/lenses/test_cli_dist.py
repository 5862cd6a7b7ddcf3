"""``fxlens lens train|eval|plot`` end to end on a tiny saved model, and two-process torchrun training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fxlens
from fxlens.cli import main
from fxlens.lenses import LensEval, TrainConfig, load_lens, tokenize_chunks, train_lens
from tests.lenses.lens_helpers import tiny_lm_dir, write_corpus

TRAIN = ["--seq-len", "16", "--steps", "4", "--batch-size", "4", "--micro-batch", "2", "--checkpoint-every", "2",
         "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinylm")
    texts = write_corpus(root / "text")
    held = write_corpus(root / "held", n_files=1, words=400, seed=5)
    return tiny_lm_dir(root / "model", texts), root / "text", held[0]


def test_cli_train_eval_plot(tiny, tmp_path, capsys):
    model_dir, text, held = tiny
    out = tmp_path / "lens"
    assert main(["lens", "train", "--model", str(model_dir), "--text", str(text), "--out", str(out), *TRAIN]) == 0
    assert {"config.json", "params.safetensors", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    assert "4 steps run" in capsys.readouterr().out
    # a rerun with --resume finds the finished checkpoint and runs nothing
    main(["lens", "train", "--model", str(model_dir), "--text", str(text), "--out", str(out), "--resume", *TRAIN])
    assert "0 steps run" in capsys.readouterr().out

    ev_dir = tmp_path / "eval"
    assert main(["lens", "eval", "--model", str(model_dir), "--text", str(held), "--lens", str(out),
                 "--out", str(ev_dir), "--seq-len", "16", "--max-chunks", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | logit lens | tuned lens |" in printed
    ev = LensEval.load(ev_dir / "eval.json")
    assert set(ev.metrics) == {"logit lens", "tuned lens"} and ev.n_tokens == 5 * 15 and ev.n_bytes > 0

    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    assert main(["lens", "plot", "--eval", str(ev_dir / "eval.json"), "--out", str(plots), "--model", str(model_dir),
                 "--lens", str(out), "--prompt", "the man walked to the garden"]) == 0
    names = {p.name for p in plots.iterdir()}
    assert {"bits_per_byte.png", "kl.png", "trajectory_logit_lens.png", "trajectory_tuned_lens.png"} <= names
    # plotly is in the lens extra: the interactive versions are written too
    assert {"bits_per_byte.html", "trajectory_logit_lens.html", "trajectory_tuned_lens.html"} <= names
    html = (plots / "trajectory_tuned_lens.html").read_text()
    assert "plotly" in html and '"type":"heatmap"' in html.replace(" ", "")


def test_plot_without_plotly_writes_png_only(tiny, tmp_path, monkeypatch):
    from fxlens.lenses import plots as P

    def missing():
        raise ImportError("interactive plots need plotly: pip install plotly")

    monkeypatch.setattr(P, "_plotly", missing)
    model_dir, _, _ = tiny
    out = tmp_path / "plots"
    assert main(["lens", "plot", "--out", str(out), "--model", str(model_dir), "--prompt", "the man walked"]) == 0
    assert {p.suffix for p in out.iterdir()} == {".png"}
    with pytest.raises(ImportError, match="pip install plotly"):
        P.metric_html(None, tmp_path / "x.html")


def test_device_map_loading_and_training(tiny, tmp_path, capsys):
    """A model loaded with an HF ``device_map`` (accelerate placement) traces, matches, and trains a lens."""
    model_dir, text, _ = tiny
    plain = fxlens.from_pretrained(str(model_dir))
    ids = torch.randint(0, plain.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for device_map in ("auto", dm):
        mapped = fxlens.from_pretrained(str(model_dir), device_map=device_map)
        torch.testing.assert_close(mapped(ids), plain(ids), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="offloaded"):  # disk offload: weights are not materialised
        fxlens.from_pretrained(str(model_dir), device_map={**dm, "model.layers.1": "disk"},
                               offload_folder=str(tmp_path / "offload"))
    out = tmp_path / "lens"
    assert main(["lens", "train", "--model", str(model_dir), "--text", str(text), "--out", str(out),
                 "--device-map", "auto", *TRAIN]) == 0
    assert "4 steps run" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    assert main(["lens", "plot", "--out", str(tmp_path)]) == 2  # a user error: one line, status 2
    with pytest.raises(SystemExit):
        main(["lens", "train", "--out", str(tmp_path)])  # --model and --text are required


def test_sites_command_still_works(capsys):
    assert "sites" in main.__globals__["build_parser"]().format_help()


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tiny, tmp_path):
    """Data-parallel training (2 processes, gloo) gives the single-process lens up to float noise."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python executable")
    model_dir, text, _ = tiny
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FXLENS_DIST_BACKEND": "gloo"}
    cmd = [torchrun, "--nproc_per_node=2", "--standalone", "-m", "fxlens.cli", "lens", "train",
           "--model", str(model_dir), "--text", str(text), "--out", str(out), *TRAIN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    m = fxlens.from_pretrained(str(model_dir))
    chunks = tokenize_chunks(m.tokenizer, str(text), 16)
    single = train_lens(m, chunks, TrainConfig(steps=4, batch_size=4, micro_batch=2, progress=False))
    dist_lens = load_lens(m, out)
    moved = 0.0
    for a, b in zip(single.lens.layer_translators.parameters(), dist_lens.layer_translators.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
        moved = max(moved, float(a.detach().abs().max()))
    assert moved > 1e-4  # the lens actually trained
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.slow
def test_sigkill_then_resume_ends_identical_to_an_uninterrupted_run(tiny, tmp_path):
    """A training process killed with SIGKILL mid-run, resumed with --resume, gives the uninterrupted lens."""
    from safetensors.torch import load_file

    model_dir, text, _ = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--seq-len", "16", "--steps", "40", "--batch-size", "4", "--micro-batch", "2", "--checkpoint-every", "3",
            "--no-progress"]

    def cmd(out):
        return [sys.executable, "-m", "fxlens.cli", "lens", "train", "--model", str(model_dir), "--text", str(text),
                "--out", str(out), *args]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, t0 = killed / "checkpoint.pt", time.monotonic()
    while not ckpt.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() - t0 < 240, "no checkpoint after 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= step < 40 and not (killed / "params.safetensors").exists()

    resumed = subprocess.run([*cmd(killed), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{40 - step} steps run" in resumed.stdout
    whole = tmp_path / "whole"
    ref = subprocess.run(cmd(whole), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = load_file(killed / "params.safetensors"), load_file(whole / "params.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert max(float(v.abs().max()) for v in a.values()) > 1e-4  # it trained
