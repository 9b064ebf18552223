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


# ------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["run"], ["show"], ["compare"]])
def test_help_explains_the_metric_and_gives_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in text.split(" --"):  # one option's help: its default said at most once
        assert option.count("(default") <= 1 and option.count("None (default)") + option.count("(default: None)") <= 1, \
            option
    if command in ([], ["run"]):
        assert "normalized loss ~ active dictionary features per token" in text and "higher = less sparse" in text
        assert "too small to converge leaves a hook's row flagged 'not converged'" in text


# ------------------------------------------------------------------------------------------------- show, compare
def _saved(tmp_path, name, tokens=3000, **options):
    from tl_sparsity.coding.options import LearnerOptions

    opts = {**LearnerOptions().as_dict(), "d_in": 32, **options}
    opts.pop("device")
    rows = [{"hook": f"blocks.{i}.hook_resid_post", "layer": i, "site": "resid_post", "n_rows": 3010 + i,
             "normalized_loss": 3.0 + i, "fvu": 0.1, "converged": i == 0} for i in range(2)]
    meta = {"model": {"model_class": "TransformerBridge", "model_name": "tiny", "transformer_lens": "4.3.0",
                      "dtype": "float32"}, "options": opts,
            "run": {"tokens_requested": tokens, "until": "converged", "max_minutes": None, "text": "pydoc",
                    "ctx_len": 32, "batch_size": 8, "device": "cpu"}}
    return SparsityReport(rows, meta).save(tmp_path / f"{name}.json")


def test_show_prints_the_metadata_before_the_table(tmp_path, capsys):
    assert cli.main(["show", str(_saved(tmp_path, "a", replay=1))]) == 0
    out = capsys.readouterr().out
    head, table = out.split("\n\n| hook", 1)
    assert head.splitlines() == [
        "model: TransformerBridge tiny (TransformerLens 4.3.0, dtype float32)",
        "hooks: 2 — resid_post at layers 0, 1",
        "tokens: 3010 to 3011 rows per hook (n_rows); budget --tokens 3000, until converged, text pydoc, windows of "
        "32 tokens, 8 per forward",
        "device: cpu",
        "options differing from the defaults: replay=1",
        "converged: 1 of 2 hooks"]
    assert table.count("| blocks.") == 2


def test_compare_warns_naming_the_budget_and_options_that_differ(tmp_path, capsys):
    a, b = _saved(tmp_path, "a"), _saved(tmp_path, "b", tokens=6000, replay=1)
    assert cli.main(["compare", str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    for text in (out.splitlines()[0], err):
        assert "differ in budget or learner options" in text
        assert "tokens_requested: 3000 (a), 6000 (b)" in text and "replay: None (a), 1 (b)" in text
    assert "normalized_loss_ratio" in out
    assert cli.main(["compare", str(a), str(_saved(tmp_path, "c"))]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in out + err


def test_an_option_a_report_predates_counts_as_the_value_runs_had_before_it_existed(tmp_path, capsys):
    """A report written before ``rate_checks`` existed was measured without rate checks: show and compare say so,
    instead of taking it for today's default."""
    import json

    old = _saved(tmp_path, "old")
    data = json.loads(old.read_text())
    del data["meta"]["options"]["rate_checks"]
    old.write_text(json.dumps(data))
    assert cli.main(["show", str(old)]) == 0
    assert ("options differing from the defaults: rate_checks=0 (not recorded: made before the option existed)"
            in capsys.readouterr().out)
    assert cli.main(["compare", str(old), str(_saved(tmp_path, "new"))]) == 0
    out, err = capsys.readouterr()
    assert "rate_checks: 0 (a), 3 (b)" in out.splitlines()[0] and "rate_checks" in err
    assert cli.main(["compare", str(old), str(_saved(tmp_path, "same", rate_checks=0))]) == 0
    assert "warning" not in "".join(capsys.readouterr())


# ------------------------------------------------------------------------------------------------- resume
RUN = ["--hooks", "resid_post", "--tokens", "3000", "--ctx-len", "32", "--learner-batch-size", "256",
       "--no-progress"]


@pytest.mark.skipif(not _has_bridge(), reason="needs TransformerBridge (TransformerLens >= 3)")
def test_a_killed_run_resumed_gives_the_uninterrupted_report(gpt2_folder, tmp_path, monkeypatch, capsys):
    from tl_sparsity.tl import fitting

    run = ["run", "--model", str(gpt2_folder), *RUN]
    assert cli.main([*run, "--out", str(tmp_path / "whole")]) == 0
    whole = SparsityReport.load(tmp_path / "whole" / "report.json")
    forward, calls = fitting.fit_batch, []

    def killed_at_the_fifth(*a, **k):  # Ctrl-C during the fifth forward: checkpoints after forwards 2 and 4
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(fitting, "fit_batch", killed_at_the_fifth)
    out = tmp_path / "killed"
    assert cli.main([*run, "--out", str(out), "--checkpoint-every", "2"]) == 130
    assert f"continue with tl-sparsity run --resume {out}" in capsys.readouterr().err
    assert not (out / "report.json").exists() and (out / "checkpoint" / "ckpt-000002").is_dir()
    monkeypatch.setattr(fitting, "fit_batch", forward)
    assert cli.main(["run", "--resume", str(out)]) == 0
    resumed = SparsityReport.load(out / "report.json")
    assert resumed.rows == whole.rows and resumed.meta["options"] == whole.meta["options"]
    assert resumed.meta["run"]["tokens_requested"] == 3000 and len(calls) == 5
    # finished: a second --resume is refused unless --force, which refits from the last checkpoint: the same report
    assert cli.main(["run", "--resume", str(out)]) == 2
    assert "the run has finished" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(out), "--force", "--no-progress"]) == 0
    assert SparsityReport.load(out / "report.json").rows == whole.rows


def test_resume_errors_name_the_problem(tmp_path, capsys):
    from tl_sparsity.cli_resume import prepare

    assert cli.main(["run", "--resume", str(tmp_path / "gone")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli.main(["run", "--resume", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert "not a checkpointed run" in err and "--checkpoint-every" in err
    out = tmp_path / "run"
    argv = ["run", "--model", "tiny", *RUN, "--out", str(out), "--checkpoint-every", "2"]
    args = cli._parser().parse_args(argv)
    prepare(args, cli.given_arguments(argv))  # what a run writes before it starts: checkpoint/run.json
    assert cli.main(["run", "--resume", str(out), "--tokens", "5000", "--tol", "0.02", "--expansion", "4"]) == 2
    err = capsys.readouterr().err
    assert "the options differ" in err and "--tokens 5000 here, 3000 in the saved run" in err
    assert "--expansion 4 here, 8 in the saved run" in err and "--tol" not in err  # 0.02: the saved value
    assert cli.main(["run", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "drop --out" in capsys.readouterr().err
    (out / "checkpoint" / "LATEST").write_text("{}")  # a checkpoint there: a new run must not silently take it
    assert cli.main(["run", "--model", "tiny", *RUN, "--out", str(out), "--checkpoint-every", "2"]) == 2
    assert f"continue it with tl-sparsity run --resume {out}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not _has_bridge(), reason="needs TransformerBridge (TransformerLens >= 3)")
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_report(gpt2_folder, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    run = ["run", "--model", str(gpt2_folder), *RUN, "--tokens", "12000"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tl_sparsity", *run, "--out", str(out), "--checkpoint-every", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = out / "checkpoint" / "LATEST", time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and json.loads(latest.read_text() or "{}").get("checkpoint", "") >= "ckpt-000003":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "report.json").exists()
    assert cli.main(["run", "--resume", str(out)]) == 0
    assert cli.main([*run, "--out", str(tmp_path / "whole")]) == 0
    whole = SparsityReport.load(tmp_path / "whole" / "report.json")
    assert SparsityReport.load(out / "report.json").rows == whole.rows


@pytest.mark.parametrize("flags, device, expected", [
    ([], "cpu", (256, 1)), ([], "cuda", (1024, None)), (["--replay", "7"], "cpu", (1024, 7)),
    (["--learner-batch-size", "512"], "cpu", (512, None))])
def test_cpu_gets_smaller_learner_batches_unless_either_option_is_given(flags, device, expected, monkeypatch):
    from tl_sparsity import cli_run

    seen = {}
    monkeypatch.setattr(cli_run, "run", lambda args, options: seen.update(options) or [])
    assert cli.main(["run", "--device", device, *flags]) == 0
    assert (seen["batch_size"], seen["replay"]) == expected
