"""fedcca.cli: `fedcca merge` end to end on checkpoints written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcca.cli import main
from fedcca.merging.merger import recompute_batchnorm
from tests.tiny_models import outputs, symmetric_copy

build_model = pytest.importorskip("fedcca.models").build_model
ARCH = {"model": "cnn", "width": 1, "num_classes": 10, "in_channels": 1}


def _cnn(seed: int, **overrides: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    arch = {**ARCH, **overrides}
    return build_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       width=arch["width"]).eval()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A raw state-dict checkpoint, a dict checkpoint (its symmetric copy), calibration .pt and .npy."""
    model = _cnn(0)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    paths = {name: tmp_path / name for name in ("a.pt", "b.pt", "calib.pt", "calib.npy")}
    torch.save(model.state_dict(), paths["a.pt"])
    torch.save({**ARCH, "state_dict": symmetric_copy(model).state_dict()}, paths["b.pt"])
    torch.save(x, paths["calib.pt"])
    np.save(paths["calib.npy"], x.numpy())
    return paths


@pytest.mark.parametrize("calibration", ["calib.pt", "calib.npy"])
def test_merge_command_recovers_a_symmetric_copy(files: dict[str, Path], tmp_path: Path, calibration: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "merged.pt"
    code = main(["merge", str(files["a.pt"]), str(files["b.pt"]), "--calibration", str(files[calibration]),
                 "--method", "cca", "--ridge", "0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "method: cca  models: 2" in printed and "mean regularised canonical correlation 1.0000 (ridge 0, trace mode)" in printed
    saved = torch.load(out, weights_only=True)
    assert {k: saved[k] for k in ARCH} == ARCH and saved["method"] == "cca"
    merged = _cnn(5)
    merged.load_state_dict(saved["state_dict"])
    x = torch.load(files["calib.pt"], weights_only=True)
    expected = recompute_batchnorm(_cnn(0), x)
    torch.testing.assert_close(outputs(merged, x), outputs(expected, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["permute", "weight-matching", "direct"])
def test_merge_command_runs_every_method(files: dict[str, Path], tmp_path: Path, method: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{method}.pt"
    args = ["merge", str(files["a.pt"]), str(files["a.pt"]), "--calibration", str(files["calib.pt"]),
            "--method", method, "--reference", "1", "--out", str(out)]
    assert main(args) == 0
    assert f"method: {method}" in capsys.readouterr().out
    assert out.is_file()


def _assert_clean_error(code: int, capsys: pytest.CaptureFixture[str], words: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_file_is_one_line_and_exit_2(files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["merge", str(files["a.pt"]), str(tmp_path / "nope.pt"), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, "nope.pt does not exist")
    code = main(["merge", str(files["a.pt"]), "--calibration", str(tmp_path / "none.npy")])
    _assert_clean_error(code, capsys, "none.npy does not exist")


def test_architecture_mismatch_is_one_line_and_exit_2(files: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    wide = tmp_path / "wide.pt"
    torch.save(_cnn(1, width=2).state_dict(), wide)
    code = main(["merge", str(files["a.pt"]), str(wide), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, "wide.pt does not fit cnn")
    tagged = tmp_path / "tagged.pt"
    torch.save({**ARCH, "width": 2, "state_dict": _cnn(1, width=2).state_dict()}, tagged)
    code = main(["merge", str(files["b.pt"]), str(tagged), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, "architecture mismatch between checkpoints: width differs")


def test_bad_options_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(files["a.pt"]), "--calibration", str(files["calib.pt"]), "--method", "fedma"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    code = main(["merge", str(files["a.pt"]), "--calibration", str(files["calib.pt"]), "--reference", "3"])
    _assert_clean_error(code, capsys, "--reference 3")


def test_an_output_that_is_an_input_or_unwritable_is_refused_before_any_work(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = files["a.pt"].read_bytes()
    for out in (files["a.pt"], files["calib.pt"]):
        code = main(["merge", str(files["a.pt"]), str(files["b.pt"]), "--calibration", str(files["calib.pt"]),
                     "--out", str(out)])
        _assert_clean_error(code, capsys, "is one of the inputs")
    assert files["a.pt"].read_bytes() == before
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["merge", str(files["a.pt"]), str(files["b.pt"]), "--calibration", str(files["calib.pt"]),
                 "--out", str(blocker / "merged.pt")])
    _assert_clean_error(code, capsys, "cannot write there")


@pytest.mark.parametrize(("content", "words"), [(b"", "cannot be read as a checkpoint"),
                                                (b"hello, not torch", "cannot be read as a checkpoint")])
def test_unreadable_checkpoints_are_one_line(files: dict[str, Path], tmp_path: Path, content: bytes, words: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    code = main(["merge", str(files["a.pt"]), str(bad), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, f"{bad} {words}")


def test_a_pickled_module_checkpoint_is_one_line(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pickled = tmp_path / "module.pt"
    torch.save(_cnn(2), pickled)  # the whole module: not loadable with weights_only
    code = main(["merge", str(files["a.pt"]), str(pickled), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, "torch.save(model.state_dict(), path)")


def test_calibration_that_overflows_float32_and_a_single_checkpoint_are_refused(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = tmp_path / "huge.pt"
    torch.save(torch.full((4, 1, 28, 28), 1e200, dtype=torch.float64), huge)
    code = main(["merge", str(files["a.pt"]), str(files["b.pt"]), "--calibration", str(huge)])
    _assert_clean_error(code, capsys, "not finite in float32")
    code = main(["merge", str(files["a.pt"]), "--calibration", str(files["calib.pt"]), "--out", str(tmp_path / "m.pt")])
    _assert_clean_error(code, capsys, "at least 2 checkpoints")
    assert not (tmp_path / "m.pt").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fedcca ")


def test_calibration_of_the_wrong_shape_and_nan_weights_name_the_file(files: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.randn(8, 3, 28, 28), wrong)  # 3 channels for a 1-channel model
    code = main(["merge", str(files["a.pt"]), str(files["b.pt"]), "--calibration", str(wrong),
                 "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"calibration file {wrong} (shape (8, 3, 28, 28)) does not fit" in err[0]
    broken = _cnn(3).state_dict()
    first = next(iter(broken))
    broken[first].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(broken, bad)
    code = main(["merge", str(files["a.pt"]), str(bad), "--calibration", str(files["calib.pt"]),
                 "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{bad} has non-finite values in {first!r}" in err[0]


def test_a_user_model_is_found_from_the_working_directory(files: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedcca merge --model userapp.task:Net` run from the app's own folder (the console script's sys.path
    does not hold the working directory)."""
    app = tmp_path / "app"
    (app / "userapp").mkdir(parents=True)
    (app / "userapp" / "__init__.py").write_text("")
    (app / "userapp" / "task.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 16), nn.ReLU(),\n"
        "                         nn.Linear(16, num_classes))\n")
    monkeypatch.chdir(app)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(app))])
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 10))
        paths.append(tmp_path / f"user{seed}.pt")
        torch.save(model.state_dict(), paths[-1])
    out = tmp_path / "user-merged.pt"
    assert main(["merge", *map(str, paths), "--calibration", str(files["calib.pt"]), "--model", "userapp.task:Net",
                 "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["model"] == "userapp.task:Net"


@pytest.mark.parametrize("named", ["os:abort", "pdb:set_trace", "evilmod:Net"])
def test_a_checkpoint_never_names_code_to_run(files: dict[str, Path], tmp_path: Path, named: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Metadata naming a callable (os:abort killed the process, pdb:set_trace opened a debugger, a module in the
    working folder was imported) is refused before anything is imported or called."""
    monkeypatch.chdir(tmp_path)
    ran = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(ran)!r}, 'w').write('imported')\nNet = object\n")
    forged = tmp_path / "forged.pt"
    torch.save({**ARCH, "model": named, "state_dict": _cnn(3).state_dict()}, forged)
    called: list[str] = []
    monkeypatch.setattr("fedcca.app.federation.build_user_model", lambda *a, **k: called.append(a[0]))
    code = main(["merge", str(files["a.pt"]), str(forged), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, f"{forged} names model {named!r}, which is not built in")
    assert not ran.exists() and not called


@pytest.mark.parametrize(("field", "value"), [("model", 3), ("num_classes", "10"), ("width", -1.0),
                                              ("in_channels", True)])
def test_checkpoint_fields_are_plain_values(files: dict[str, Path], tmp_path: Path, field: str, value: object,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    forged = tmp_path / "fields.pt"
    torch.save({**ARCH, field: value, "state_dict": _cnn(3).state_dict()}, forged)
    code = main(["merge", str(files["a.pt"]), str(forged), "--calibration", str(files["calib.pt"])])
    _assert_clean_error(code, capsys, f"{forged}: checkpoint field {field!r}")
