"""The ``tl-sparsity`` command: layer selection, and a full run on a local tiny model folder (no download)."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from tl_sparsity import SparsityReport, cli  # noqa: E402
from tl_sparsity.tl.models import _has_bridge  # noqa: E402


def test_layers_accept_lists_and_slices_and_reject_out_of_range():
    assert cli.parse_layers(None, 4) == [0, 1, 2, 3]
    assert cli.parse_layers("2,0,2", 4) == [0, 2]
    assert cli.parse_layers("0:30:5", 30) == [0, 5, 10, 15, 20, 25]
    assert cli.parse_layers("::2", 5, max_layers=3) == [0, 2]
    with pytest.raises(ValueError, match=r"out of range: this model has layers 0\.\.3"):
        cli.parse_layers("1,4", 4)
    with pytest.raises(ValueError, match="not a comma-separated list"):
        cli.parse_layers("a,b", 4)
    with pytest.raises(ValueError, match="select no layer"):
        cli.parse_layers("3", 4, max_layers=2)


def test_hook_spec_expands_aliases_at_the_chosen_layers_and_passes_names_through():
    spec = cli.hook_spec("resid_post, mlp_post,hook_embed", 3, layers="0,2")
    assert spec == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.0.mlp.hook_post",
                    "blocks.2.mlp.hook_post", "hook_embed"]
    with pytest.raises(ValueError, match="--hooks is empty"):
        cli.hook_spec(" , ", 3)


@pytest.mark.skipif(not _has_bridge(), reason="needs TransformerBridge (TransformerLens >= 3)")
def test_run_writes_the_four_files_and_a_report_per_hook(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "--model", str(gpt2_folder), "--hooks", "resid_post,mlp_post", "--tokens", "3000",
                   "--ctx-len", "32", "--learner-batch-size", "256", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["profile.png", "report.csv", "report.html", "report.json"]
    rep = SparsityReport.load(out / "report.json")
    assert sorted(r["hook"] for r in rep.rows) == ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post",
                                                   "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert all(r["status"].startswith(("ok", "not converged")) and r["n_tokens"] + r["n_heldout"] > 3000 - 256
               for r in rep.rows)  # < one batch pending
    assert rep.meta["run"]["command"].startswith("tl-sparsity run --model")
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert printed.count("| blocks.") == 4 and "tokens per hook" in printed
    # show / compare read the saved report back
    assert cli.main(["show", str(out / "report.json")]) == 0
    assert cli.main(["compare", str(out / "report.json"), str(out / "report.json")]) == 0
    assert "normalized_loss_ratio" in capsys.readouterr().out


@pytest.mark.skipif(not _has_bridge(), reason="needs TransformerBridge (TransformerLens >= 3)")
def test_run_with_controls_neurons_and_parameter_activation(gpt2_folder, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["run", "--model", str(gpt2_folder), "--hooks", "resid_post,mlp_post", "--layers", "1",
                   "--tokens", "1500", "--ctx-len", "32", "--learner-batch-size", "256", "--out", str(out),
                   "--no-progress", "--controls", "--param-activation", "3"])
    assert rc == 0 and (out / "param_activation.png").exists()
    rep = SparsityReport.load(out / "report.json")
    for r in rep.rows:
        assert r["sparsity_ratio"] == pytest.approx(r["control_normalized_loss"] / r["normalized_loss"])
    assert rep["blocks.1.mlp.hook_post"]["dead_frac"] is not None  # neurons: auto = on for mlp_post only
    assert len(rep.neurons("blocks.1.mlp.hook_post")) == 128
    pa = rep.table("parameter_activation")
    assert list(pa["layer"]) == [0, 1] and pa["share"].between(0, 1).all()


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["run", "--model", str(tmp_path / "missing"), "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


@pytest.mark.skipif(not _has_bridge(), reason="needs TransformerBridge (TransformerLens >= 3)")
def test_neuron_profile_example_runs_on_a_local_model(gpt2_folder, capsys):
    import runpy
    from pathlib import Path

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "neuron_profile.py"))
    rows, pa = mod["main"](["--model", str(gpt2_folder), "--tokens", "600", "--ctx-len", "32", "--param-samples",
                            "2", "--site", "post"])
    assert [r["layer"] for r in rows] == [0, 1] and all(r["n_tokens_seen"] >= 600 for r in rows)
    assert list(pa["layer"]) == [0, 1]
    assert capsys.readouterr().out.count("| 1 |") == 2  # one neuron row and one parameter row for layer 1
