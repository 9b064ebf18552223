"""SparsityReport views: plot data, comparisons, CSV/HTML, JSON round trip."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from tl_sparsity import SparsityReport  # noqa: E402


def _report(scale: float = 1.0, with_control: bool = False) -> SparsityReport:
    rows = []
    for site in ("resid_post", "mlp_post"):
        for layer in range(3):
            name = f"blocks.{layer}.hook_resid_post" if site == "resid_post" else f"blocks.{layer}.mlp.hook_post"
            r = {"hook": name, "layer": layer, "site": site, "normalized_loss": scale * (layer + 2.0),
                 "normalized_loss_se": 0.1 * (layer + 1), "fvu": 0.01 * (layer + 1), "status": "ok"}
            if with_control:
                r["control_normalized_loss"] = 30.0
            rows.append(r)
    rows.append({"hook": "hook_embed", "layer": None, "site": "embed", "normalized_loss": 1.5,
                 "normalized_loss_se": 0.05, "fvu": 0.001, "status": "ok"})
    return SparsityReport(rows, {"model": {"model_name": "toy"}})


def test_plot_draws_one_line_per_site_with_layers_on_x_and_error_bars():
    ax = _report().plot()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["resid_post", "mlp_post", "embed"]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "normalized loss"
    resid = ax.containers[0]  # ErrorbarContainer of the first site
    xs, ys = resid.lines[0].get_data()
    assert list(xs) == [0, 1, 2] and list(ys) == [2.0, 3.0, 4.0]
    segs = resid.lines[2][0].get_segments()  # vertical error bars: ±se around each point
    assert [v for s in segs for v in s[:, 1]] == pytest.approx([1.9, 2.1, 2.8, 3.2, 3.7, 4.3])
    assert "emb" in [t.get_text() for t in ax.get_xticklabels()]


def test_plot_adds_a_dashed_control_line_per_site_when_controls_are_present():
    ax = _report(with_control=True).plot()
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 2 and all(list(ln.get_ydata()) == [30.0] * 3 for ln in dashed)


def test_plot_rejects_unknown_column_and_empty_report():
    with pytest.raises(KeyError, match="no column 'nope'"):
        _report().plot("nope")
    with pytest.raises(ValueError, match="no rows"):
        SparsityReport([]).plot()


def test_compare_aligns_hooks_and_gives_ratios():
    a, b = _report(), _report(scale=2.0)
    b.rows = b.rows[1:]  # b lacks blocks.0.hook_resid_post
    df = a.compare(b, labels=("base", "new"))
    assert df.loc["blocks.1.hook_resid_post", "normalized_loss_base"] == 3.0
    assert df.loc["blocks.1.hook_resid_post", "normalized_loss_new"] == 6.0
    assert df.loc["blocks.1.hook_resid_post", "normalized_loss_ratio"] == 2.0
    assert math.isnan(df.loc["blocks.0.hook_resid_post", "normalized_loss_new"])
    assert list(df.index)[0] == "blocks.0.hook_resid_post" and len(df) == 7
    with pytest.raises(KeyError, match="no column"):
        a.compare(b, columns="nope")
    with pytest.raises(TypeError):
        a.compare({"rows": []})


def test_csv_html_and_json_round_trip(tmp_path):
    rep = _report(with_control=True)
    rep.to_csv(tmp_path / "r.csv")
    import pandas as pd

    back = pd.read_csv(tmp_path / "r.csv", index_col="hook")
    assert back.loc["blocks.2.mlp.hook_post", "normalized_loss"] == 4.0
    assert "<table" in rep.to_html() and "toy" in rep.to_html()
    assert SparsityReport.load(rep.save(tmp_path / "r.json")) == rep


def test_tables_round_trip_and_neurons_view(tmp_path):
    rep = _report()
    rep.tables["neurons/blocks.0.mlp.hook_post"] = [{"neuron": 0, "frequency": 0.0, "kind": "dead"},
                                                   {"neuron": 1, "frequency": 0.25, "kind": "token"}]
    rep.tables["parameter_activation"] = [{"layer": 0, "share": 0.5}]
    back = SparsityReport.load(rep.save(tmp_path / "r.json"))
    assert back == rep
    assert back.neurons("blocks.0.mlp.hook_post").loc[1, "kind"] == "token"
    assert back.table("parameter_activation")["share"].tolist() == [0.5]
    with pytest.raises(KeyError, match="no neuron statistics"):
        back.neurons("blocks.1.mlp.hook_post")


REASON = "held-out normalized loss moved -4.1% over the last half of 180 steps (tolerance 2%)"


def _convergence_report(late: bool = True) -> SparsityReport:
    """Three hooks: a converged one, one unconverged (when ``late``), one from an old report without the keys."""
    ok = {"converged": True, "n_steps": 400, "drift": 0.004, "convergence": "converged", "status": "ok"}
    bad = ({"converged": False, "n_steps": 180, "drift": -0.041, "convergence": REASON,
            "status": f"not converged: {REASON}"} if late else ok)
    base = {"site": "resid_post", "normalized_loss_se": 0.123, "fvu": 0.05}
    rows = [{**base, "hook": "blocks.0.hook_resid_post", "layer": 0, "normalized_loss": 10.0, **ok},
            {**base, "hook": "blocks.1.hook_<b>", "layer": 1, "normalized_loss": 12.345, **bad},
            {**base, "hook": "blocks.2.hook_resid_post", "layer": 2, "normalized_loss": 14.0, "status": "ok"}]
    return SparsityReport(rows, {"model": {"model_name": "toy"}})


def test_markdown_flags_unconverged_numbers_and_lists_them_after_the_table():
    md = _convergence_report().to_markdown()
    table, footer = md.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split(" | ")[-2:] == ["converged", "n_steps |"]
    assert "12.345 ± 0.123 ⚠" in lines[3] and lines[3].endswith("| NO | 180 |")
    assert "⚠" not in lines[2] + lines[4] and lines[2].endswith("| yes | 400 |") and lines[4].endswith("| — | — |")
    assert footer == f"⚠ not converged (1 of 3 hooks): blocks.1.hook_<b>: {REASON}"
    assert "⚠" not in _convergence_report(late=False).to_markdown()


def test_html_marks_unconverged_rows_only_with_an_escaped_note():
    page = _convergence_report().to_html()
    assert page.count('class="tl-not-converged"') == 1 and page.count("<tr") == 3 + 2  # 2 header rows
    row = page.split('class="tl-not-converged"')[1].split("</tr>")[0]
    assert "blocks.1.hook_&lt;b&gt;" in row and "12.35" in row
    assert f"⚠ not converged (1 of 3 hooks): blocks.1.hook_&lt;b&gt;: {REASON}" in page
    assert "<b>:" not in page
    clean = _convergence_report(late=False).to_html()
    assert "tl-not-converged" not in clean and "not converged" not in clean


def test_plot_rings_unconverged_points_with_a_legend_entry():
    ax = _convergence_report().plot()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["not converged", "resid_post"]
    (ring,) = ax.collections[-1:]
    assert ring.get_label() == "not converged" and ring.get_offsets().tolist() == [[1.0, 12.345]]
    assert list(ax.containers[0].lines[0].get_ydata()) == [10.0, 12.345, 14.0]  # the line itself is unchanged
    ax = _convergence_report(late=False).plot()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["resid_post"]


def test_convergence_fields_are_columns_and_survive_the_json_round_trip(tmp_path):
    rep = _convergence_report()
    rep.rows[1]["drift"] = float("nan")
    cols = list(rep.df.columns)
    assert cols[cols.index("fvu") + 1:cols.index("fvu") + 6] == ["converged", "n_steps", "drift", "rate_change",
                                                                 "convergence"]
    assert cols[-1] == "status"
    back = SparsityReport.load(rep.save(tmp_path / "r.json"))
    assert back == rep
    assert back.rows[0]["converged"] is True and back.rows[1]["converged"] is False
    assert math.isnan(back.rows[1]["drift"]) and back.rows[1]["n_steps"] == 180
    assert back.rows[1]["convergence"] == REASON and "converged" not in back.rows[2]


def test_old_rows_without_convergence_keys_render_without_a_flag():
    rep = _report(with_control=True)  # rows as saved before the convergence fields existed
    md = rep.to_markdown()
    assert "⚠" not in md and "not converged" not in md and "| — | — |" in md
    assert "tl-not-converged" not in rep.to_html() and "not converged" not in repr(rep)
    assert "not converged" not in [t.get_text() for t in rep.plot().get_legend().get_texts()]
    assert rep.df["converged"].isna().all()


@pytest.mark.parametrize("layers", [[0, 1], [0, 1, None], list(range(30)), [5]])
def test_plot_ticks_are_whole_layers(layers):
    """A two-layer report shows ticks 0 and 1 (not 0.2, 0.4, …); many layers get integer ticks only; emb at −1."""
    rows = [{"hook": f"blocks.{x}.hook_resid_post" if x is not None else "hook_embed", "layer": x,
             "site": "resid_post" if x is not None else "embed", "normalized_loss": 2.0} for x in layers]
    ax = SparsityReport(rows).plot()
    ax.figure.canvas.draw()
    ticks = [float(t) for t in ax.get_xticks()]
    shown = [t for t, lab in zip(ticks, ax.get_xticklabels()) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown and all(t.is_integer() for t in shown)
    blocks = [x for x in layers if x is not None]
    if len(blocks) <= 12:
        assert [t for t in shown if t >= 0] == blocks
    assert (-1.0 in shown) == (None in layers)
    labels = [lab.get_text() for lab in ax.get_xticklabels()]
    assert ("emb" in labels) == (None in layers) and all(lab.lstrip("-").isdigit() or lab == "emb" for lab in labels)
