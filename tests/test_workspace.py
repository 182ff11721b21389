"""The workspace remembers dataset roots and the current selection; environment variables win."""

import pytest

from rsretrieve.errors import RSRetrieveError
from rsretrieve.workspace import DEFAULT_DATASET, DEFAULT_MODEL, Workspace, default_workspace_path


def test_defaults_with_nothing_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("RSRETRIEVE_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_workspace_path().name == "rsretrieve-workspace"
    selection = Workspace(tmp_path / "ws").select(remember=False)
    assert (selection.dataset, selection.model, selection.subset, selection.checkpoint) == (DEFAULT_DATASET, DEFAULT_MODEL, None, None)
    assert not (tmp_path / "ws").exists()  # looking does not create anything


def test_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("RSRETRIEVE_WORKSPACE", str(tmp_path / "from-env"))
    assert Workspace().path == tmp_path / "from-env"
    monkeypatch.setenv("RSRETRIEVE_BENV2_ROOT", str(tmp_path / "benv2"))
    assert Workspace(tmp_path / "ws").select("benv2", remember=False).root == str(tmp_path / "benv2")


def test_roots_and_selection_are_remembered(tmp_path, monkeypatch):
    monkeypatch.delenv("RSRETRIEVE_BENV2_ROOT", raising=False)
    ws = Workspace(tmp_path / "ws")
    root = tmp_path / "BigEarthNet-v2"
    root.mkdir()
    ws.select("benv2", root, "csmoe-p14", subset="BENv2-14k")
    again = Workspace(tmp_path / "ws").select(remember=False)
    assert (again.dataset, again.root, again.model, again.subset) == ("benv2", str(root.resolve()), "csmoe-p14", "BENv2-14k")
    assert ws.selection_store(again).name == "benv2-BENv2-14k--csmoe-p14.zarr"
    # another dataset does not inherit the subset; coming back to benv2 finds its root again
    other = ws.select("sample")
    assert other.subset is None and other.model == "csmoe-p14"
    assert ws.select("benv2", remember=False).root == str(root.resolve())


def test_a_checkpoint_names_the_model(tmp_path):
    ckpt = tmp_path / "csmoe-p16-epoch150.safetensors"
    ckpt.write_bytes(b"")
    selection = Workspace(tmp_path / "ws").select(checkpoint=ckpt, remember=False)
    assert selection.model == "csmoe-p16-epoch150" and selection.model_spec == str(ckpt.resolve())


def test_corrupt_config_is_a_clear_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.path.mkdir()
    ws.config_path.write_text("{not json")
    with pytest.raises(RSRetrieveError, match="config.json: not valid JSON"):
        ws.select()
