"""``encoder.weights=auto`` downloads a missing official file (``toolkit.encoders.download``), tested against a local
HTTP server on 127.0.0.1 (the official hosts are not reachable from the test machines): ``TOOLKIT_WEIGHTS_BASE_URL``
points the official URLs at it, and torch hub's / CLIP's / the HF hub caches are redirected into tmp_path.

A served file lands in the cache under its official name and loads to the same features as the file itself; a second
``auto`` reads the cache without a request; a wrong checksum, a transfer cut short, an HTTP error, a refused
connection, an HTML page instead of the file and a Ctrl-C each leave nothing in the cache and say why; offline
(``HF_HUB_OFFLINE`` / ``TOOLKIT_OFFLINE``) nothing is requested and the error names the URL to fetch by hand."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as save_safetensors

from toolkit.encoders import clip, download, r3m
from toolkit.encoders.dinov2 import DINOv2Encoder, weight_source
from toolkit.encoders.download import HubSource, UrlSource
from toolkit.encoders.weights import clip_cache, hf_hub_cache, resolve_weights, torch_hub_checkpoints
from toolkit.errors import ToolkitError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, tuple[str, bytes]] = {}  # path -> (how, body)
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    """GET/HEAD of ``server.routes``: ``file`` = the body; ``truncate`` = a Content-Length of the whole body, half of
    it sent, then the connection closed; ``html`` = an HTML page with status 200; ``hf`` = a Hugging Face hub file
    (``X-Repo-Commit`` and ``ETag`` headers). Anything else: 404 (with the hub's EntryNotFound code under
    ``/resolve/``)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        how, data = self.server.routes.get(self.path, ("missing", b""))
        if how == "missing":
            self.send_response(404)
            if "/resolve/" in self.path:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if how == "html" else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        if how == "hf":
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2] if how == "truncate" else data)
            self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def online(tmp_path, monkeypatch, server) -> Path:
    """Caches in tmp_path, downloads on, the official hosts replaced by the local server."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "TOOLKIT_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HOME", "TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("TOOLKIT_WEIGHTS_BASE_URL", server.url + "/")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read by huggingface_hub at import
    return tmp_path


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def mirror_path(url: str) -> str:
    """Where the official ``url`` sits on the local server (``<base>/<host>/<path>``)."""
    return "/" + url.split("://", 1)[1]


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> tuple[Path, bytes]:
    """A random DINOv2 ViT-S/14 in the official torch.hub layout (518 px position grid, ``mask_token``), fp16 to
    keep it small (the encoder loads it into fp32 parameters)."""
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, p in model.state_dict().items():
        one = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        sd[name] = (torch.randn(p.shape, generator=gen) * 0.05 + one).half()
    sd["mask_token"] = torch.zeros(1, 384, dtype=torch.float16)
    path = tmp_path_factory.mktemp("served") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, path.read_bytes()


def small_torch_file() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(10.0)}, buf)
    return buf.getvalue()


# --- a served file lands in the cache ----------------------------------------------------------------------------

def test_auto_downloads_into_torch_hub_cache_and_then_uses_it(online, server, dino_file):
    path, data = dino_file
    source = weight_source("vits14")
    assert source.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    served = mirror_path(source.url)
    assert source.fetch_url() == server.url + served
    server.routes[served] = ("file", data)

    enc = DINOv2Encoder("vits14", weights="auto", image_size=56)
    cached = online / "torch_home" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert torch_hub_checkpoints() == cached.parent
    assert enc.weights_path == cached and cached.read_bytes() == data
    assert files_under(cached.parent) == [cached]  # no temporary file left
    assert server.requests == [("GET", served)]
    assert cached.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a normal file, not mkstemp's 0600

    ref = DINOv2Encoder("vits14", weights=str(path), image_size=56)
    x = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x))

    again = DINOv2Encoder("vits14", weights="auto", image_size=56)  # from the cache: no second request
    assert again.weights_path == cached and len(server.requests) == 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_url_sources_and_mirror_layout(monkeypatch):
    """The official URLs (README's table) and where TOOLKIT_WEIGHTS_BASE_URL reads them from."""
    from toolkit.encoders import mae

    monkeypatch.delenv("TOOLKIT_WEIGHTS_BASE_URL", raising=False)
    assert weight_source("vitl14_reg").url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    assert mae.weight_source("vitb16").url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    src = clip.weight_source("ViT-B-32")
    assert src.url == ("https://openaipublic.azureedge.net/clip/models/"
                       "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
    assert (src.sha256, src.dest, src.cache) == (src.url.split("/")[-2], "ViT-B-32.pt", "clip")
    assert src.fetch_url() == src.url
    hub = clip.weight_source("ViT-H-14")
    assert isinstance(hub, HubSource) and hub.repo_id == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    r = r3m.weight_source("resnet18")
    assert "1A1ic-p4KtYlKXdXHcV2QV0cUzI4kn0u-" in r.url and r.dest == "r3m_18/model.pt"
    assert UrlSource("https://x.org/a/vit_b_32-quickgelu-laion400m_e31-d867053b.pt", "f.pt").hash_prefix == "d867053b"
    monkeypatch.setenv("TOOLKIT_WEIGHTS_BASE_URL", "http://mirror.lan/weights/")
    assert src.fetch_url() == ("http://mirror.lan/weights/openaipublic.azureedge.net/clip/models/"
                               "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
    assert r.fetch_url() == "http://mirror.lan/weights/r3m/r3m_18/model.pt"


# --- checksums -----------------------------------------------------------------------------------------------------

def test_openai_clip_wrong_checksum_is_refused_and_removed(online, server):
    source = clip.weight_source("ViT-B-32")
    served = mirror_path(source.url)
    data = small_torch_file()
    server.routes[served] = ("file", data)
    with pytest.raises(ToolkitError) as err:
        clip.load_clip_checkpoint("ViT-B-32", "auto")
    msg = str(err.value)
    assert f"expected SHA-256 {source.sha256}, got {hashlib.sha256(data).hexdigest()}" in msg, msg
    assert server.url + served in msg and str(clip_cache() / "ViT-B-32.pt") in msg, msg
    assert clip_cache() == online / "xdg_cache_home" / "clip"
    assert files_under(online) == []  # not even the partial download
    assert server.requests == [("GET", served)]


def test_full_checksum_and_hash_prefix_accepted_when_right(online, server):
    data = small_torch_file()
    digest = hashlib.sha256(data).hexdigest()
    server.routes["/f.pt"] = ("file", data)
    dest = online / "cache" / "f.pt"
    assert download.download_url(server.url + "/f.pt", dest, sha256=digest, progress=False) == dest
    assert dest.read_bytes() == data
    # torch.hub's convention: the hash suffix of the file name is a prefix of its SHA-256
    named = UrlSource(f"https://example.org/w/tiny-{digest[:8]}.pt", f"tiny-{digest[:8]}.pt")
    wrong = UrlSource("https://example.org/w/tiny-deadbeef.pt", "tiny-deadbeef.pt")
    for src in (named, wrong):
        server.routes[mirror_path(src.url)] = ("file", data)
    assert named.hash_prefix == digest[:8]
    path = resolve_weights("auto", [named.dest], "tiny", named.url, source=named)
    assert path == torch_hub_checkpoints() / named.dest and path.read_bytes() == data
    with pytest.raises(ToolkitError, match=f"expected a SHA-256 starting with deadbeef.*got {digest}"):
        resolve_weights("auto", [wrong.dest], "tiny", wrong.url, source=wrong)
    assert not (torch_hub_checkpoints() / wrong.dest).exists()
    assert files_under(torch_hub_checkpoints()) == [path]


def test_concurrent_downloads_fetch_once(online, server):
    """Two processes (here threads) wanting the same file: one downloads, the other waits and takes it."""
    data = small_torch_file()
    server.routes["/f.pt"] = ("file", data)
    dest = online / "cache" / "f.pt"
    results, errors = [], []

    def fetch():
        try:
            results.append(download.download_url(server.url + "/f.pt", dest, progress=False))
        except BaseException as e:  # noqa: BLE001: a thread's error, kept for the assertion below (not swallowed)
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == [dest] * 3 and dest.read_bytes() == data
    assert server.requests == [("GET", "/f.pt")] and files_under(dest.parent) == [dest]


# --- failures leave nothing behind -----------------------------------------------------------------------------

def test_interrupted_transfer_leaves_nothing(online, server, dino_file):
    source = weight_source("vits14")
    served = mirror_path(source.url)
    server.routes[served] = ("truncate", dino_file[1])
    with pytest.raises(ToolkitError) as err:
        DINOv2Encoder("vits14", weights="auto", image_size=56)
    msg = str(err.value)
    assert "stopped after" in msg and f"of {len(dino_file[1])} bytes" in msg, msg
    assert server.url + served in msg and str(torch_hub_checkpoints() / source.dest) in msg, msg
    assert files_under(online) == []
    # the next try downloads it again (and succeeds once the server sends all of it)
    server.routes[served] = ("file", dino_file[1])
    assert DINOv2Encoder("vits14", weights="auto", image_size=56).weights_path == torch_hub_checkpoints() / source.dest


def test_ctrl_c_mid_download_removes_the_partial_file(online, server, monkeypatch):
    seen = {}
    dest_dir = torch_hub_checkpoints()

    class Interrupting(download.tqdm):
        def update(self, n=1):
            seen["files"] = [p.name for p in files_under(dest_dir)]
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", Interrupting)
    source = weight_source("vits14")
    server.routes[mirror_path(source.url)] = ("file", small_torch_file())
    with pytest.raises(KeyboardInterrupt):
        DINOv2Encoder("vits14", weights="auto", image_size=56)
    partial = [name for name in seen["files"] if not name.endswith(".lock")]
    assert len(partial) == 1 and partial[0].endswith(".partial")  # it was written under a temporary name
    assert files_under(online) == []


def test_http_error_and_refused_connection(online, server, monkeypatch):
    source = weight_source("vits14")
    dest = torch_hub_checkpoints() / source.dest
    with pytest.raises(ToolkitError) as err:  # nothing served there: 404
        DINOv2Encoder("vits14", weights="auto")
    msg = str(err.value)
    assert "HTTP 404" in msg and source.fetch_url() in msg and str(dest) in msg, msg

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TOOLKIT_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ToolkitError) as err:
        DINOv2Encoder("vits14", weights="auto")
    msg = str(err.value)
    assert "refused" in msg.lower() and f"http://127.0.0.1:{port}/" in msg and str(dest) in msg, msg
    assert files_under(online) == []


def test_html_instead_of_the_file_is_refused(online, server):
    """An R3M download (Google Drive) that returns a web page with status 200 is not cached as model.pt."""
    source = r3m.weight_source("resnet18")
    server.routes["/r3m/r3m_18/model.pt"] = ("html", b"<!DOCTYPE html><html><body>Google Drive - Virus scan warning")
    with pytest.raises(ToolkitError, match="not a checkpoint.*DOCTYPE") as err:
        r3m.R3MEncoder("resnet18", weights="auto")
    assert str(torch_hub_checkpoints() / source.dest) in str(err.value)
    assert files_under(online) == []


# --- offline -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TOOLKIT_OFFLINE"])
def test_offline_requests_nothing(online, server, monkeypatch, var, dino_file):
    source = weight_source("vits14")
    server.routes[mirror_path(source.url)] = ("file", dino_file[1])
    monkeypatch.setenv(var, "1")
    with pytest.raises(ToolkitError) as err:
        DINOv2Encoder("vits14", weights="auto")
    msg = str(err.value)
    assert f"{var}=1" in msg and source.fetch_url() in msg and str(torch_hub_checkpoints() / source.dest) in msg, msg
    assert source.url in msg  # the official URL too ("published at")
    assert server.requests == [] and files_under(online) == []
    monkeypatch.setenv(var, "0")  # false values do not turn downloads off
    assert DINOv2Encoder("vits14", weights="auto", image_size=56).weights_path == torch_hub_checkpoints() / source.dest


# --- Hugging Face hub (timm / open_clip weights) ----------------------------------------------------------------------

def test_hub_download_into_hf_cache(online, server, monkeypatch):
    """A CLIP variant OpenAI does not publish (ViT-H-14): open_clip's HF repository, via hf_hub_download into the HF
    cache where ``auto``'s patterns find it; the safetensors file is tried first, the .bin next."""
    source = clip.weight_source("ViT-H-14")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    data = save_safetensors({"w": torch.arange(4.0)})
    server.routes[f"/{source.repo_id}/resolve/main/open_clip_pytorch_model.bin"] = ("hf", small_torch_file())
    path = resolve_weights("auto", clip.weight_patterns("ViT-H-14"), "CLIP ViT-H-14", clip.PUBLISHED, source=source)
    assert path.name == "open_clip_pytorch_model.bin" and path.read_bytes() == small_torch_file()
    assert path.is_relative_to(hf_hub_cache()) and hf_hub_cache() == online / "hf_home" / "hub"
    assert path.parent.parent.parent.name == "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"

    server.routes[f"/{source.repo_id}/resolve/main/open_clip_model.safetensors"] = ("hf", data)
    path.unlink()  # with the safetensors file published, that one is taken
    n = len(server.requests)
    path = resolve_weights("auto", clip.weight_patterns("ViT-H-14"), "CLIP ViT-H-14", clip.PUBLISHED, source=source)
    assert path.name == "open_clip_model.safetensors" and path.read_bytes() == data
    assert len(server.requests) > n
    n = len(server.requests)
    assert resolve_weights("auto", clip.weight_patterns("ViT-H-14"), "", "", source=source) == path
    assert len(server.requests) == n  # cached: no request

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match=r"HF_HUB_OFFLINE=1.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main"):
        resolve_weights("auto", ["nothing-here"], "CLIP ViT-H-14", clip.PUBLISHED, source=source)
