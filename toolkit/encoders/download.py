"""Downloading official pretrained weights for ``encoder.weights=auto`` (see ``weights.resolve_weights``).

Two kinds of source:

- :class:`UrlSource`: a file at its publisher's URL (FAIR's ``dl.fbaipublicfiles.com`` for DINOv2 and MAE, OpenAI's
  ``openaipublic.azureedge.net`` for CLIP, Google Drive for R3M), fetched into a standard cache (torch hub's
  ``checkpoints`` dir, or ``~/.cache/clip`` for OpenAI CLIP) by :func:`download_url`: with a tqdm progress bar, into a
  temporary file in the same directory that is ``os.replace``-d into place only once it is complete and its checksum
  (where the publisher gives one) passed. Whatever goes wrong, KeyboardInterrupt included, the temporary file is
  removed: a file under the official name is always a complete one.
- :class:`HubSource`: a file of a Hugging Face hub repository (timm / open_clip weights), fetched by
  ``huggingface_hub.hf_hub_download`` into the HF hub cache (which has its own atomic ``.incomplete`` handling).

Checksums: OpenAI's CLIP URLs carry the file's SHA-256 (``.../clip/models/<sha256>/ViT-B-32.pt``), which is checked
in full; a file name with torch.hub's hash suffix (``name-<hex>.ext``) must have a SHA-256 starting with that hex, as
``torch.hub.load_state_dict_from_url(check_hash=True)`` checks. Every downloaded file must also look like what it
claims to be (a torch zip archive or pickle, or a safetensors header): an HTML page served with status 200 (an
interstitial, a captive portal) is refused instead of being cached.

Switches (read when a download is about to start):

- ``HF_HUB_OFFLINE`` / ``TOOLKIT_OFFLINE`` set to a true value (``1``, ``true``, ``yes``, ``on``): no download, the
  missing file is an error naming the URL to fetch by hand and where to put it.
- ``TOOLKIT_WEIGHTS_BASE_URL=<base>``: fetch every :class:`UrlSource` from a mirror instead of its publisher: a file
  published at ``https://<host>/<path>`` is read from ``<base>/<host>/<path>`` (the layout ``wget -x`` makes); R3M's
  Google Drive files from ``<base>/r3m/r3m_<18|34|50>/model.pt``. Checksums are checked as for the official host.
- ``HF_ENDPOINT``: huggingface_hub's own mirror setting, used for :class:`HubSource` downloads.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TOOLKIT_OFFLINE")
BASE_URL_VAR = "TOOLKIT_WEIGHTS_BASE_URL"
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole transfer
CHUNK = 1 << 20
USER_AGENT = "robot-toolkit (weights download; urllib)"
# torch.hub's convention: ``resnet18-f37072fd.pth`` -> the file's SHA-256 starts with f37072fd
HASH_SUFFIX = re.compile(r"-([a-f0-9]{6,})\.")
_SHA256 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class UrlSource:
    """A file at its publisher's URL. ``dest``: its path relative to the cache dir named by ``cache``
    (``"torch_hub"`` = torch hub's ``checkpoints`` dir, ``"clip"`` = ``~/.cache/clip``). ``sha256``: the full
    checksum where the publisher gives one; ``mirror_path``: its path under ``TOOLKIT_WEIGHTS_BASE_URL`` when the
    URL's own ``<host>/<path>`` does not name the file (Google Drive)."""

    url: str
    dest: str
    cache: str = "torch_hub"
    sha256: str | None = None
    mirror_path: str | None = None

    @property
    def hash_prefix(self) -> str | None:
        """torch.hub's hash suffix of the file name (``name-<hex>.ext``), if any and no full checksum is known."""
        if self.sha256:
            return None
        match = HASH_SUFFIX.search(os.path.basename(urllib.parse.urlsplit(self.url).path))
        return match.group(1) if match else None

    def fetch_url(self) -> str:
        """The URL a download reads: the official one, or its copy under ``TOOLKIT_WEIGHTS_BASE_URL``."""
        base = os.environ.get(BASE_URL_VAR, "").strip()
        if not base:
            return self.url
        parts = urllib.parse.urlsplit(self.url)
        path = self.mirror_path or f"{parts.netloc}{parts.path}"
        return f"{base.rstrip('/')}/{path.lstrip('/')}"


@dataclass(frozen=True)
class HubSource:
    """A file of a Hugging Face hub repository; the first of ``filenames`` the repository has is fetched."""

    repo_id: str
    filenames: tuple[str, ...]
    revision: str | None = None

    def fetch_url(self) -> str:
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{self.repo_id}/resolve/{self.revision or 'main'}/{self.filenames[0]}"


Source = UrlSource | HubSource


def openai_clip_source(url: str, dest: str | None = None) -> UrlSource:
    """An OpenAI CLIP URL (``https://openaipublic.azureedge.net/clip/models/<sha256>/<name>.pt``): the SHA-256 is the
    path's second-to-last part, as OpenAI's ``clip._download`` reads it. The file goes to ``~/.cache/clip``."""
    parts = urllib.parse.urlsplit(url).path.rstrip("/").split("/")
    sha = parts[-2] if len(parts) >= 2 and _SHA256.fullmatch(parts[-2]) else None
    return UrlSource(url, dest or parts[-1], cache="clip", sha256=sha)


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or ``TOOLKIT_OFFLINE=...``) when downloads are off, else None."""
    for var in OFFLINE_VARS:
        if _true(os.environ.get(var)):
            return f"{var}={os.environ[var]}"
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _not_a_checkpoint(path: Path, name: str) -> str | None:
    """Why the file at ``path`` (to be named ``name``) is not a checkpoint, or None if it looks like one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if name.endswith(".safetensors"):
        size = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if 0 < size < (1 << 30) and head[8:9] == b"{":
            return None
        return f"no safetensors header (it starts with {head[:32]!r})"
    if head[:1] == b"\x80" or zipfile.is_zipfile(path):  # a pickle, or torch.save's / TorchScript's zip archive
        return None
    return f"neither a PyTorch zip archive nor a pickle (it starts with {head[:32]!r})"


def download_url(url: str, dest: Path, *, sha256: str | None = None, hash_prefix: str | None = None,
                 what: str = "the checkpoint", progress: bool = True) -> Path:
    """Fetch ``url`` into ``dest`` atomically: a temporary file in ``dest``'s directory, checked (complete, SHA-256 /
    hash prefix, looks like a checkpoint), then ``os.replace``-d to ``dest``. On any failure (KeyboardInterrupt
    included) the temporary file is removed and ``dest`` is left as it was; errors are ToolkitErrors naming the URL
    and ``dest``."""
    dest = Path(dest)
    where = f"{what} from {url} to {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolkitError(f"Cannot download {where}: cannot create {dest.parent} ({e})") from None
    # One download per file at a time across processes (e.g. the ranks of a DDP job building the same encoder): the
    # others wait, then find the file in place. Without the lock the result would still be right (each process writes
    # its own temporary file and the rename is atomic), only fetched several times.
    from filelock import FileLock

    lock_path = dest.parent / f".{dest.name}.lock"
    try:
        with FileLock(lock_path):
            if dest.is_file():
                log.info(f"{dest}: downloaded meanwhile by another process")
                return dest
            return _download(url, dest, where, sha256, hash_prefix, what, progress)
    finally:
        lock_path.unlink(missing_ok=True)  # best effort; a lock file left behind is harmless


def _download(url: str, dest: Path, where: str, sha256: str | None, hash_prefix: str | None, what: str,
              progress: bool) -> Path:
    log.info(f"Downloading {what}: {url} -> {dest}")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    tmp: Path | None = None
    size, length = 0, None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
            tmp = Path(name)
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024,
                                                  desc=dest.name, file=sys.stderr, disable=not progress,
                                                  dynamic_ncols=True) as bar:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        if length is not None and size != length:
            raise ToolkitError(f"Download of {where} stopped after {size} of {length} bytes (the connection was "
                               f"closed); nothing was written to {dest}. Run again to retry")
        got = digest.hexdigest()
        if sha256 and got != sha256.lower():
            raise ToolkitError(f"Download of {where}: wrong checksum: expected SHA-256 {sha256.lower()}, got {got} "
                               f"({size} bytes); the download was deleted and nothing was written to {dest}")
        if hash_prefix and not got.startswith(hash_prefix.lower()):
            raise ToolkitError(f"Download of {where}: wrong checksum: expected a SHA-256 starting with {hash_prefix} "
                               f"(the file name's hash suffix), got {got}; the download was deleted and nothing was "
                               f"written to {dest}")
        bad = _not_a_checkpoint(tmp, dest.name)
        if bad:
            raise ToolkitError(f"Download of {where}: what came back is not a checkpoint: {bad} ({size} bytes); it was "
                               f"deleted and nothing was written to {dest}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
        tmp = None
    except urllib.error.HTTPError as e:
        raise ToolkitError(f"Cannot download {where}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ToolkitError(f"Cannot download {where}: {e.reason}. Is the machine online? Set TOOLKIT_OFFLINE=1 to "
                           f"turn downloads off, and put the file there by hand") from None
    except http.client.IncompleteRead as e:
        total = f" of {length}" if length is not None else ""
        raise ToolkitError(f"Download of {where} stopped after {size + len(e.partial)}{total} bytes (the connection "
                           f"was closed); nothing was written to {dest}. Run again to retry") from None
    except (http.client.HTTPException, socket.timeout, ConnectionError) as e:
        raise ToolkitError(f"Download of {where} failed ({e!r}); nothing was written to {dest}. "
                           f"Run again to retry") from None
    except OSError as e:
        raise ToolkitError(f"Download of {where} failed ({e}); nothing was written to {dest}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest


def download_hub(source: HubSource, cache_dir: Path, what: str = "the checkpoint") -> Path:
    """``hf_hub_download`` the first of ``source.filenames`` the repository has into the HF hub cache ``cache_dir``
    (``models--<org>--<name>/snapshots/<commit>/<file>``). ``HF_ENDPOINT`` is read now (huggingface_hub reads it when
    it is imported)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    for i, filename in enumerate(source.filenames):
        url = HubSource(source.repo_id, (filename,), source.revision).fetch_url()
        log.info(f"Downloading {what}: {url} -> {cache_dir}")
        try:
            return Path(hf_hub_download(source.repo_id, filename, revision=source.revision, cache_dir=cache_dir,
                                        endpoint=endpoint))
        except RemoteEntryNotFoundError:
            if i + 1 < len(source.filenames):
                continue
            raise ToolkitError(f"Cannot download {what}: {source.repo_id} has none of {', '.join(source.filenames)} "
                               f"({source.fetch_url()}); cache: {cache_dir}") from None
        except Exception as e:  # noqa: BLE001: huggingface_hub raises many kinds (HTTP, connection, metadata, offline)
            first = (str(e).strip().splitlines() or [""])[0]
            raise ToolkitError(f"Cannot download {what} from {url} into the Hugging Face cache {cache_dir}: "
                               f"{type(e).__name__}: {first}") from None
    raise AssertionError("unreachable")
