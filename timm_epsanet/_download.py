"""Pretrained weights from the Hugging Face Hub: bounded in time and retries, verified, clear errors.

Left to itself, a download through huggingface_hub retries a Hub that hangs for minutes, loops
on one that cuts every response, never checks the bytes against the Hub's hash, and reports a
bare `ReadTimeout`. Here one pretrained download:
  * asks the Hub for the file's metadata at most `HEAD_TRIES` times, `HF_HUB_ETAG_TIMEOUT` each;
  * then lets huggingface_hub download it into its usual cache (so `HF_HUB_OFFLINE`, tokens,
    mirrors and `hf cache` keep working), stopped once it has received the file `MAX_TRANSFERS`
    times over or the whole download has taken `TIMM_EPSANET_DOWNLOAD_TIMEOUT` seconds;
  * checks the file against its sha256 (an LFS file's ETag, which names its blob in the cache),
    and removes a file that does not match from the cache.
Every failure is a `DownloadError` naming the repo and file, what happened, and what to do.
"""
import hashlib
import math
import os
import re
import threading
import time
from typing import Optional, Sequence, Tuple

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import tqdm as hf_tqdm

from timm.models._hub import hf_split

__all__ = ['DEFAULT_TIMEOUT', 'DownloadError', 'TIMEOUT_ENV', 'download_timeout', 'fetch_weights']

TIMEOUT_ENV = 'TIMM_EPSANET_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT = 900.0  # s: the largest file (epsanet101_large, 215 MB) at 0.25 MB/s
HEAD_TRIES = 2
MAX_TRANSFERS = 2
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_verified = set()  # (blob path, size, mtime) already hashed in this process


class DownloadError(RuntimeError):
    """Pretrained weights that could not be fetched from the Hub; the message says why and what to do."""


class _Stopped(Exception):
    """Raised inside huggingface_hub's transfer loop to end it."""


def download_timeout() -> float:
    """Seconds one pretrained download may take in total: TIMM_EPSANET_DOWNLOAD_TIMEOUT or the default."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None or not value.strip():
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f'{TIMEOUT_ENV}={value!r}: expected a positive number of seconds')
    return seconds


def _get_it_yourself(repo_id: str, filename: str) -> str:
    return (f'or download it yourself (`hf download {repo_id} {filename}`) and pass '
            f'pretrained_cfg_overlay=dict(file="path/to/{filename}").')


def _retry_advice(repo_id: str, filename: str, timeout: float) -> str:
    return (f'Check the connection and HF_ENDPOINT and try again; allow more time with {TIMEOUT_ENV}=<seconds> '
            f'(now {timeout:g}); ' + _get_it_yourself(repo_id, filename))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_path(path: str, repo_id: str, filename: str, expected: Optional[str]) -> str:
    """`path` if its bytes hash to the sha256 it was stored under; else remove it and raise."""
    blob = os.path.realpath(path)
    name = os.path.basename(blob)
    expected = name if _SHA256.match(name) else expected
    if not expected or not _SHA256.match(expected):
        return path  # a small non-LFS file: the Hub gives no sha256 for it
    stat = os.stat(blob)
    key = (blob, stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return path
    actual = _sha256(blob)
    if actual != expected:
        for p in {blob, path}:
            try:
                os.remove(p)
            except OSError:
                pass
        raise DownloadError(
            f'{filename} of {repo_id}: the downloaded file does not match the Hub\'s sha256 ({expected[:16]}..., '
            f'got {actual[:16]}...): it was corrupted or altered on the way. It has been removed from the cache; '
            f'try again, and if it happens again report it to the owner of {repo_id}.')
    _verified.add(key)
    return path


def _metadata(repo_id: str, filename: str, revision: Optional[str]):
    """The file's Hub metadata, None if the repo has no such file, or an exception to report."""
    url = hf_hub_url(repo_id, filename, revision=revision)
    wait = constants.HF_HUB_ETAG_TIMEOUT
    error = None
    for _ in range(HEAD_TRIES):
        try:
            return get_hf_file_metadata(url, timeout=wait), None
        except EntryNotFoundError:
            return None, None
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            return None, e
        except HfHubHTTPError as e:
            error = e
            status = e.response.status_code if e.response is not None else None
            if status is not None and status < 500 and status != 429:
                break  # a refusal, not a transient failure
        except Exception as e:  # timeouts, refused connections, proxies: all transient
            error = e
    return None, error


def _head_failure(repo_id: str, filename: str, error: Exception) -> DownloadError:
    where = f'{filename} of {repo_id} on {constants.ENDPOINT}'
    if isinstance(error, GatedRepoError):
        return DownloadError(f'{where}: the repo is gated; accept its terms on the Hub and log in (`hf auth login`).')
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(f'{where}: no such repo (or it is private: log in with `hf auth login`). Check the '
                             f'repo name, or TIMM_EPSANET_HUB_ORG / hf_hub_id if you set them.')
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f'{where}: no such revision. Check the name after "@" in the repo id.')
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return DownloadError(f'{where}: the Hub answered HTTP {error.response.status_code} ({HEAD_TRIES} tries), '
                             f'and the file is not in the local cache. The Hub has a problem: try again later, '
                             + _get_it_yourself(repo_id, filename))
    what = (f'no answer within {constants.HF_HUB_ETAG_TIMEOUT:g} s, set by HF_HUB_ETAG_TIMEOUT'
            if 'timeout' in type(error).__name__.lower() else f'{type(error).__name__}: {error}')
    return DownloadError(f'{where}: could not reach the Hub ({what}; {HEAD_TRIES} tries), and the file is not in '
                         f'the local cache. Check the connection and HF_ENDPOINT and try again, '
                         + _get_it_yourself(repo_id, filename))


def _guard(size: Optional[int], stop: threading.Event, received: list):
    """A progress bar class for huggingface_hub that ends the transfer when told, or when it loops."""
    limit = MAX_TRANSFERS * size if size else None

    class Guard(hf_tqdm):
        def update(self, n=1):
            if stop.is_set():
                raise _Stopped('time is up')
            if n and n > 0:
                received[0] += n
                if limit is not None and received[0] > limit:
                    raise _Stopped('transfers')
            return super().update(n)

    return Guard


def _download(repo_id, filename, revision, cache_dir, size, deadline, timeout) -> str:
    stop, received, result = threading.Event(), [0], {}

    def work():
        try:
            result['path'] = hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir,
                etag_timeout=constants.HF_HUB_ETAG_TIMEOUT, tqdm_class=_guard(size, stop, received))
        except BaseException as e:  # reported by the waiting thread
            result['error'] = e

    worker = threading.Thread(target=work, name=f'timm_epsanet download {filename}', daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    where = f'{filename} of {repo_id}'
    mb = f'{received[0] / 1e6:.1f} MB' + (f' of {size / 1e6:.1f} MB' if size else '')
    if worker.is_alive():
        stop.set()  # the worker ends at its next chunk; it never writes a partial file into the cache
        raise DownloadError(f'{where}: the download did not finish within {timeout:g} s ({mb} received). '
                            + _retry_advice(repo_id, filename, timeout))
    error = result.get('error')
    if isinstance(error, _Stopped):
        raise DownloadError(f'{where}: the Hub kept breaking off the transfer and starting over (received '
                            f'{received[0] / 1e6:.1f} MB for a {size / 1e6:.1f} MB file); gave up. '
                            + _retry_advice(repo_id, filename, timeout))
    if error is not None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ''
        raise DownloadError(f'{where}: the download failed ({type(error).__name__}: {first[:300]}; {mb} received). '
                            + _retry_advice(repo_id, filename, timeout))
    return result['path']


def fetch_weights(
        hub_id: str, filenames: Sequence[str] = WEIGHT_FILES, cache_dir=None,
) -> Tuple[str, str]:
    """(local path, file name) of the first of `filenames` that `hub_id` ('org/repo[@revision]') holds."""
    repo_id, revision = hf_split(hub_id)
    timeout = download_timeout()
    deadline = time.monotonic() + timeout
    if constants.HF_HUB_OFFLINE:
        for filename in filenames:
            path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if isinstance(path, str):
                return _verified_path(path, repo_id, filename, None), filename
        raise DownloadError(
            f'The weights of {repo_id} ({" or ".join(filenames)}) are not in the local Hugging Face cache and '
            f'HF_HUB_OFFLINE is set, so they cannot be downloaded. Run once with network access (HF_HUB_OFFLINE '
            f'unset) to cache them, or pass a local file: pretrained_cfg_overlay=dict(file="model.safetensors").')
    for filename in filenames:
        meta, error = _metadata(repo_id, filename, revision)
        if error is not None:
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if isinstance(cached, str):  # as huggingface_hub does: a Hub that cannot be reached serves the cache
                return _verified_path(cached, repo_id, filename, None), filename
            raise _head_failure(repo_id, filename, error)
        if meta is None:
            continue
        path = _download(repo_id, filename, revision, cache_dir, meta.size, deadline, timeout)
        return _verified_path(path, repo_id, filename, meta.etag), filename
    raise DownloadError(f'{repo_id} on {constants.ENDPOINT} holds none of {", ".join(filenames)}: it has no '
                        f'weights timm can load. Check the repo name.')
