"""The console a person reads: a run that stops itself mid-bar still prints its error on a line
of its own."""

from byol_flax.runtime import console, logs


def test_an_interrupting_line_starts_on_its_own_line_while_a_bar_is_drawn(capfd, monkeypatch):
    monkeypatch.setattr(logs.Settings, "enabled", True)  # bars show, as in a command
    bar = console.progress(total=20, initial=0, description="pre-training")
    bar.update(11)
    bar.refresh()  # the bar is drawn and the cursor stays on its line
    console.interrupt("error: LeaseLostError: taken over")
    err = capfd.readouterr().err
    assert err.splitlines()[-1] == "error: LeaseLostError: taken over"
    assert "pre-training" in err.splitlines()[-2]
    bar.close()
    capfd.readouterr()
    console.interrupt("error: after the bar")
    assert capfd.readouterr().err == "error: after the bar\n"  # no blank line when none is open
