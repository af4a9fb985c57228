"""Released-weight table and downloads (res2net.models.download) against a real HTTP server on 127.0.0.1, and the
fetched file loaded into a model."""

import hashlib
import http.server
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from local_server import local_http_server

import res2net
from res2net.models import download
from res2net.models.download import download_checkpoint, hash_prefix
from res2net.models.loading import load_pretrained
from res2net.models.variants import RELEASED

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(base_width=4, layers=[1, 1, 1, 1], scale=2, num_classes=10)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from server.files: '/good/<name>' whole, '/truncated/<name>' cut short, '/corrupt/<name>'
    with changed bytes; anything else is a 404. Every request path is recorded in server.requests."""

    def do_GET(self):
        self.server.requests.append(self.path)
        kind, _, name = self.path.strip("/").partition("/")
        data = self.server.files.get(name)
        if data is None or kind not in ("good", "truncated", "corrupt"):
            self.send_error(404)
            return
        if kind == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) + (1000 if kind == "truncated" else 0)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if kind == "truncated" else data)
        if kind == "truncated":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with local_http_server(_Handler, files={}) as httpd:
        yield httpd


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("RES2NET_CACHE", str(directory))
    monkeypatch.delenv("RES2NET_MIRRORS", raising=False)
    return directory


def _serialize(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _publish(server, stem: str, obj) -> str:
    """Put obj on the server under '<stem>-<sha256 prefix>.pth'; return the file name."""
    data = _serialize(obj)
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server.files[name] = data
    return name


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return res2net.create_model("res2net50_26w_4s", zero_init_last=False, **TINY)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_released_table_has_both_public_locations_and_published_accuracy():
    assert sorted(RELEASED) == [
        "res2net101_26w_4s",
        "res2net50_14w_8s",
        "res2net50_26w_4s",
        "res2net50_26w_6s",
        "res2net50_26w_8s",
        "res2net50_48w_2s",
        "res2next50",
    ]
    for name, entry in RELEASED.items():
        assert re.fullmatch(r"[a-z0-9_]+-[0-9a-f]{8}\.pth", entry.file) and hash_prefix(entry.file)
        assert entry.urls == (
            f"https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-res2net/{entry.file}",
            f"https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net/{entry.file}",
        )
        assert 77 < entry.top1 < 80 and 93 < entry.top5 < 95
        assert entry.hub_id == f"timm/{name}.in1k"
    assert RELEASED["res2next50"].file == "res2next50_4s-6ef7e7bf.pth"
    assert (RELEASED["res2net50_26w_4s"].top1, RELEASED["res2net50_26w_4s"].top5) == (77.994, 93.860)


def test_good_file_downloads_into_cache_and_loads(server, cache, tiny_model):
    name = _publish(server, "tiny", tiny_model.state_dict())
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    load_pretrained(model, f"{server.base}/good/{name}")
    assert _same_weights(model, tiny_model)
    assert _files_in(cache) == [name]
    # A second load uses the cached file.
    load_pretrained(model, f"{server.base}/good/{name}")
    assert server.requests == [f"/good/{name}"]


def test_wrong_hash_is_rejected_and_nothing_is_left(server, cache, tiny_model):
    data = _serialize(tiny_model.state_dict())
    wrong = "deadbeef" if not hashlib.sha256(data).hexdigest().startswith("deadbeef") else "cafebabe"
    server.files[f"tiny-{wrong}.pth"] = data
    with pytest.raises(RuntimeError, match=f'invalid hash value \\(expected "{wrong}"'):
        download_checkpoint(f"tiny-{wrong}.pth", urls=[f"{server.base}/good/tiny-{wrong}.pth"], progress=False)
    assert _files_in(cache) == []


def test_interrupted_transfer_leaves_no_complete_looking_file(server, cache, tiny_model):
    # No hash in the name: only the missing end of the zip archive (torch.save's format) shows the short transfer.
    server.files["plain.pth"] = _serialize(tiny_model.state_dict())
    with pytest.raises(RuntimeError, match="transfer interrupted"):
        download_checkpoint("plain.pth", urls=[f"{server.base}/truncated/plain.pth"], progress=False)
    assert _files_in(cache) == []


def test_second_location_used_when_first_answers_404_or_fails(server, cache, tiny_model):
    name = _publish(server, "tiny", tiny_model.state_dict())
    urls = [
        f"{server.base}/missing/{name}",
        f"{server.base}/corrupt/{name}",
        f"{server.base}/truncated/{name}",
        "http://127.0.0.1:9/refused",
        f"{server.base}/good/{name}",
    ]
    path = download_checkpoint(name, urls=urls, progress=False)
    assert path == cache / name and hashlib.sha256(path.read_bytes()).hexdigest().startswith(hash_prefix(name))
    assert server.requests == [f"/missing/{name}", f"/corrupt/{name}", f"/truncated/{name}", f"/good/{name}"]
    assert _files_in(cache) == [name]


def test_all_locations_failing_lists_each_error(server, cache):
    with pytest.raises(RuntimeError) as info:
        download_checkpoint(
            "x-0123abcd.pth",
            urls=[f"{server.base}/a/x-0123abcd.pth", f"{server.base}/b/x-0123abcd.pth"],
            progress=False,
        )
    message = str(info.value)
    assert "/a/x-0123abcd.pth: HTTP Error 404" in message and "/b/x-0123abcd.pth: HTTP Error 404" in message
    assert "RES2NET_MIRRORS" in message


def test_mirrors_env_replaces_public_locations(server, cache, tiny_model, monkeypatch):
    name = _publish(server, "tiny", tiny_model.state_dict())
    monkeypatch.setenv("RES2NET_MIRRORS", f"{server.base}/missing/, {server.base}/good")
    assert download.checkpoint_urls("res2net50_26w_4s")[1] == (
        f"{server.base}/missing/res2net50_26w_4s-06e79181.pth",
        f"{server.base}/good/res2net50_26w_4s-06e79181.pth",
    )
    assert download_checkpoint(name, progress=False) == cache / name
    assert server.requests == [f"/missing/{name}", f"/good/{name}"]


def test_file_without_hash_is_fetched_again_not_taken_from_cache(server, cache, tiny_model):
    server.files["model.pth"] = _serialize(tiny_model.state_dict())
    cache.mkdir()
    (cache / "model.pth").write_bytes(b"an older download from another host")
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    load_pretrained(model, f"{server.base}/good/model.pth")
    assert _same_weights(model, tiny_model) and server.requests == ["/good/model.pth"]


def test_corrupt_cached_file_is_replaced(server, cache, tiny_model):
    name = _publish(server, "tiny", tiny_model.state_dict())
    cache.mkdir()
    (cache / name).write_bytes(b"not a checkpoint")
    path = download_checkpoint(name, urls=[f"{server.base}/good/{name}"], progress=False)
    assert path.read_bytes() == server.files[name]


def test_create_model_pretrained_verifies_released_file(server, cache, monkeypatch):
    # The mirror serves bytes that are not the released file: the hash check must refuse them.
    server.files["res2net50_26w_4s-06e79181.pth"] = b"wrong bytes"
    monkeypatch.setenv("RES2NET_MIRRORS", f"{server.base}/good")
    monkeypatch.setenv("HF_ENDPOINT", server.base)  # the hub fallback (test_hub.py) finds nothing there either
    with pytest.raises(RuntimeError, match='(?s)invalid hash value \\(expected "06e79181".*timm/res2net50_26w_4s.in1k'):
        res2net.create_model("res2net50_26w_4s", pretrained=True, base_width=4, layers=[1, 1, 1, 1])
    assert [name for name in _files_in(cache) if name != "hub"] == []
    with pytest.raises(RuntimeError, match="timm/res2net50d.in1k"):  # hub only: straight to the hub, which fails
        res2net.create_model("res2net50d", pretrained=True)


def test_foreign_architecture_gives_key_report(server, cache):
    name = _publish(server, "resnet18", torchvision.models.resnet18(num_classes=10).state_dict())
    model = res2net.create_model("res2net50_26w_4s", **TINY)
    with pytest.raises(RuntimeError) as info:
        load_pretrained(model, f"{server.base}/good/{name}")
    message = str(info.value)
    assert f"/good/{name} does not fit this Res2Net" in message
    assert re.search(r"missing keys \(\d+\): layer1\.0\.convs\.0\.weight", message)
    assert re.search(r"unexpected keys \(\d+\): layer1\.0\.conv2\.weight", message)
    assert (
        "wrongly shaped keys (36): layer1.0.conv1.weight: checkpoint (64, 64, 3, 3) vs model (8, 64, 1, 1)" in message
    )
    assert "... (31 more)" in message  # long lists are cut to the first few


def test_download_script_exit_codes(server, cache, monkeypatch):
    script = [sys.executable, str(ROOT / "scripts" / "download_checkpoints.py"), "--quiet"]
    bad = subprocess.run(script + ["res2net51"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "res2net50_26w_4s" in bad.stderr
    env = {**os.environ, "RES2NET_MIRRORS": f"{server.base}/good"}
    server.files["res2next50_4s-6ef7e7bf.pth"] = b"not the released file"
    failed = subprocess.run(script + ["res2next50"], capture_output=True, text=True, timeout=120, env=env)
    assert failed.returncode == 1
    assert "FAILED   res2next50" in failed.stderr and "0 of 1 checkpoints verified" in failed.stdout
    assert _files_in(cache) == []
