"""Progress bars (tqdm, on stderr) and the ``ntkscrub`` logger in readouts and baselines:
``progress=True`` shows the bar, ``None`` (default) only on a terminal, ``False`` never."""

from __future__ import annotations

import logging

import pytest
import torch
from model_zoo import make_mlp

from ntkscrub import baselines, readouts
from ntkscrub._progress import resolve_progress


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def test_relearn_time_progress_bar_and_log(capsys, caplog):
    model = make_mlp()
    full, forget = _data(30, 1), _data(8, 2)
    with caplog.at_level(logging.INFO, logger="ntkscrub"):
        readouts.relearn_time(model, full, forget, reference=model, max_epochs=2, progress=True)
    assert "relearn" in capsys.readouterr().err
    assert any("relearn_time" in r.getMessage() for r in caplog.records)
    readouts.relearn_time(model, full, forget, reference=model, max_epochs=2)
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal
    with pytest.raises(TypeError, match="progress"):
        readouts.relearn_time(model, full, forget, reference=model, progress="yes")


def test_membership_attack_progress_bar(capsys):
    model = make_mlp()
    readouts.membership_attack(model, _data(20, 3), _data(20, 4), _data(6, 5), progress=True)
    assert "membership_attack" in capsys.readouterr().err
    readouts.membership_attack(model, _data(20, 3), _data(20, 4), _data(6, 5))
    assert capsys.readouterr().err == ""


def test_baselines_epoch_bar_follows_tty_convention(capsys, caplog):
    model, init = make_mlp(), make_mlp(seed=4)
    retain = _data(20, 6)
    with caplog.at_level(logging.INFO, logger="ntkscrub"):
        baselines.finetune(model, retain, epochs=1, progress=True)
    assert "train" in capsys.readouterr().err
    assert any("finetune" in r.getMessage() for r in caplog.records)
    baselines.retrain(model, retain, init=init, epochs=1, until_zero_error=False)
    assert capsys.readouterr().err == ""
    assert resolve_progress(None) is False and resolve_progress(True) is True
    with pytest.raises(TypeError, match="progress"):
        resolve_progress(1)


def test_progress_default_is_on_in_a_jupyter_kernel(monkeypatch, capsys):
    """A notebook's stderr is no TTY, yet someone watches it: bars on by default there."""
    import sys
    import types

    from ntkscrub._progress import progress_bar

    class ZMQInteractiveShell:  # the class name IPython's kernel shell has
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: ZMQInteractiveShell()  # type: ignore[attr-defined]
    assert resolve_progress(None) is False
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert resolve_progress(None) is True and resolve_progress(False) is False
    bar = progress_bar(3, "kernel-bar")
    bar.update(1)
    bar.refresh()
    bar.close()
    assert "kernel-bar" in capsys.readouterr().err
    fake.get_ipython = lambda: None  # type: ignore[attr-defined]  # plain python, IPython imported
    assert resolve_progress(None) is False
