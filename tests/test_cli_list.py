"""`wsi-pipe list encoders|methods` prints what the registries hold (the CLI help points there)."""

from __future__ import annotations

from typer.testing import CliRunner

from wsi_pipe.cli.app import app


def test_list_reads_the_registries():
    from wsi_pipe.encoders import list_encoders
    from wsi_pipe.mil import get_spec, list_aggregators

    runner = CliRunner()
    res = runner.invoke(app, ["list", "methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in list_aggregators():
        assert f" {name} " in res.output
    assert "n_stages" in res.output and "n_stages" in get_spec("msm").options
    assert "abmil_tiny" not in res.output
    assert "abmil_tiny" in runner.invoke(app, ["list", "methods", "--tiny"]).output
    res = runner.invoke(app, ["list", "encoders"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in list_encoders(tiny=False):
        assert f" {name} " in res.output
    assert "ssmamba_tiny" not in res.output and "timm:<arch>" in res.output
    assert runner.invoke(app, ["list", "nothing"]).exit_code == 2
