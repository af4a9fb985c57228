"""The HF export writes only safetensors, and its model card loads only model.safetensors (issue 21, item 5): a pickle
someone adds to the exported folder is never unpickled by the card's code, and a folder that already holds one is
refused."""

import os
import re
from pathlib import Path

import torch
from test_export import IMG, NAME, _export, export_script, trained  # noqa: F401  (trained: the module fixture)


class _Payload:
    """Unpickling this creates ``marker``: what a hostile file dropped into the folder does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _card_code(folder: Path) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    return code


def test_the_model_cards_code_reads_only_model_safetensors(trained, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Today's card began with ``timm.create_model("local-dir:.", pretrained=True)``: timm loads any *.pth in the
    folder ahead of model.safetensors with torch.load(weights_only=False), so the added file below ran its code."""
    model, checkpoint = trained
    folder = tmp_path / "hub"
    _export("hf", checkpoint, folder, capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    code = _card_code(folder)
    assert "local-dir" not in code
    assert set(re.findall(r"[\w.-]+\.(?:safetensors|pth|bin|pt)\b", code)) == {"model.safetensors"}
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": model.state_dict(), "x": _Payload(marker)}, folder / "model.pth")
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the card's code, as a user runs it in the folder
    assert not marker.exists(), "the card's code unpickled model.pth"
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(x), model(x), rtol=0, atol=0)


def test_an_hf_export_into_a_folder_holding_a_pickle_is_refused(trained, tmp_path, capsys):  # noqa: F811
    """Today the export wrote its three files next to the pickle, which then travelled with the folder."""
    _, checkpoint = trained
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not ours")
    args = ["--model", NAME, "--checkpoint", str(checkpoint), "--format", "hf", "--out", str(folder)]
    code = export_script.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "pytorch_model.bin" in err and str(folder) in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_model.bin"]
