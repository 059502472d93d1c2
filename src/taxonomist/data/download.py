"""Fetch the images of a COCO file (FathomNet `coco_url`s) with a thread pool, retries and resume.

Stdlib HTTP only (urllib). A file lands under its final name only after it decoded as an image, so a kill at
any moment leaves either a good file or none, and a re-run fetches only what is missing.
"""
from __future__ import annotations

import csv
import email.utils
import http.client
import io
import ipaddress
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from taxonomist import __version__
from taxonomist.data.coco import read_coco, safe_relative_path, stays_inside
from taxonomist.errors import ConfigError
from taxonomist.utils.files import atomic_write_bytes, atomic_write_text
from taxonomist.utils.safe_parse import shorten

FAILURES_CSV = "download_failures.csv"
URL_KEYS = ("coco_url", "flickr_url", "url")
SCHEMES = ("http", "https")
#: a body larger than this is refused (FathomNet frames are a few MB): a hostile or broken server cannot fill
#: the memory or the disk
MAX_IMAGE_BYTES = 100 * 2**20
# characters a URL may keep as they are; the rest (spaces, non-ASCII) are percent-encoded
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"
#: the longest file or folder name (bytes) that Linux, macOS and Windows file systems accept; a file is first
#: written as `.NAME.XXXXXXXX.tmp`, 14 bytes longer, so its own name may have 14 bytes fewer
NAME_MAX = 255
_TEMP_OVERHEAD = 14


@dataclass
class DownloadSummary:
    """End-of-run counts: `downloaded` (fetched now), `skipped` (already present and decodable), and
    `failures` as (file_name, url, reason); `ok` is True when nothing failed."""

    out_dir: Path
    total: int = 0
    downloaded: int = 0
    skipped: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    failures_csv: Path | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{self.total} images → {self.out_dir}: {self.downloaded} downloaded ({self.bytes / 1e6:.1f} MB), "
                 f"{self.skipped} already present, {self.failed} failed ({self.seconds:.1f} s)"]
        for name, url, reason in self.failures[:10]:  # names and URLs come from the COCO file: cut them
            lines.append(f"  failed {shorten(name)[1:-1]}: {reason} ({shorten(url)[1:-1] or 'no URL'})")
        if self.failed > 10:
            lines.append(f"  … {self.failed - 10} more")
        if self.failures_csv:
            lines.append(f"failures listed in {self.failures_csv}; run the same command again to retry them")
        return "\n".join(lines)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _Permanent(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    """The run is being interrupted; the worker gives up without writing anything."""


class _RefusedAddress(OSError):
    """The host of a URL resolves to a loopback, link-local, private or other non-public address."""


def _public_addresses(host: str, port: int) -> list[tuple]:
    """`socket.getaddrinfo(host, port)`, or `_RefusedAddress` when any of its addresses is not a public one: a COCO
    file must not make this machine fetch from itself or its network (SSRF)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        kind = _address_kind(ip)
        if kind is not None:
            shown = "" if host.strip("[]") == str(ip) else f" resolves to {ip}, which"
            raise _RefusedAddress(f"refused: {shorten(host)[1:-1]}{shown} is a {kind} address "
                                  "(--allow-private-addresses permits it)")
    return infos


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """None for a public (global unicast) address, else what it is: loopback, link-local, private, …"""
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    return ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "multicast" if ip.is_multicast
            else "unspecified" if ip.is_unspecified else "private" if ip.is_private else "non-public")


def _connect_public(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """`socket.create_connection`, to a vetted address: the name is resolved once, here, so that a second answer
    from DNS (rebinding) cannot swap a public address for a private one between the check and the connection."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _public_addresses(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError(f"no address for {host}")


class _PublicOnly:
    """Mixed into urllib's HTTP(S) handlers: every connection, redirects included, goes to a public address."""

    def do_open(self, http_class, req, **kwargs):
        target = urllib.parse.urlsplit(req.full_url)
        if req.host != target.netloc:
            # through a proxy (http_proxy / https_proxy): the proxy connects, so the name is checked here
            _public_addresses(target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
            return super().do_open(http_class, req, **kwargs)

        def connection(*args, **kw):
            conn = http_class(*args, **kw)
            conn._create_connection = _connect_public  # http.client's hook for opening the socket
            return conn
        return super().do_open(connection, req, **kwargs)


class _PublicHTTPHandler(_PublicOnly, urllib.request.HTTPHandler):
    pass


class _PublicHTTPSHandler(_PublicOnly, urllib.request.HTTPSHandler):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an image URL has no business leaving http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            raise _Permanent(f"redirect to a refused URL scheme {scheme!r}: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_coco_images(coco_json: str | Path, out_dir: str | Path, workers: int = 8, retries: int = 4,
                         timeout: float = 30.0, progress: bool = False, backoff: float = 0.5,
                         max_backoff: float = 60.0, max_bytes: int = MAX_IMAGE_BYTES,
                         allow_private_addresses: bool = False) -> DownloadSummary:
    """Download every image of a COCO file into `out_dir/<file_name>` and say what happened.

    Each image's `coco_url` (else `flickr_url`, `url`) is fetched by one of `workers` threads. HTTP 5xx,
    429, resets, timeouts, truncated bodies and bodies that do not decode as an image are retried up to
    `retries` times, waiting `backoff × 2^attempt` seconds (± jitter, at most `max_backoff`) or the
    server's `Retry-After` (capped at `max_backoff`); other 4xx answers fail at once. A file is written
    (temp + rename) only after it decoded; one already present and decodable is skipped, so re-running
    after a kill fetches only what is missing. A `file_name` that would leave `out_dir` and URLs that are
    not http(s) are refused, also as redirect targets, and so is a file_name whose folder is a symlink leading
    out of `out_dir`; a body over `max_bytes` is refused without reading the rest. A file or folder name over
    255 bytes (241 for the file itself) is refused. A URL whose host resolves to a loopback, link-local, private or
    other non-public address is refused, also as a redirect target, unless `allow_private_addresses` (a mirror
    on the local network, a test server). Each refusal is one failure; failures are listed in the summary and in
    `out_dir/download_failures.csv`.

    >>> summary = download_coco_images("dataset_test.json", "fathomnet/images", workers=16)  # doctest: +SKIP
    >>> summary.ok, summary.downloaded + summary.skipped                                    # doctest: +SKIP
    (True, 325)
    """
    for name, value, low in (("workers", workers, 1), ("retries", retries, 0), ("max_bytes", max_bytes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} {value!r} must be an integer >= {low}")
    for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
        if not isinstance(value, (int, float)) or value < 0 or (name == "timeout" and value == 0):
            raise ConfigError(f"{name} {value!r} must be a number of seconds {'> 0' if name == 'timeout' else '>= 0'}")
    start = time.monotonic()
    out_dir = Path(out_dir)
    coco = read_coco(coco_json)
    summary = DownloadSummary(out_dir=out_dir)

    jobs: dict[str, tuple[Path, str]] = {}     # file_name → (target, url), first entry wins
    for i, image in enumerate(coco.images):
        name = image["file_name"]
        url = next((image[k] for k in URL_KEYS if isinstance(image.get(k), str) and image[k].strip()), "").strip()
        rel = safe_relative_path(name)
        if rel is None:
            summary.failures.append((name, url, "refused: file_name would escape the output folder"))
            continue
        unwritable = _unwritable_name(rel)
        if unwritable:
            summary.failures.append((name, url, unwritable))
            continue
        if name in jobs:
            if jobs[name][1] != url:
                summary.failures.append((name, url, f"refused: file_name also used by another image with URL "
                                                    f"{jobs[name][1]}"))
            continue
        if not url:
            summary.failures.append((name, "", f"images[{i}] has no {'/'.join(URL_KEYS)}"))
            continue
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in SCHEMES or not urllib.parse.urlsplit(url).netloc:
            summary.failures.append((name, url, f"refused: URL scheme {scheme or 'none'!r} is not http(s)"))
            continue
        if not stays_inside(out_dir, out_dir / rel):
            summary.failures.append((name, url, "refused: a symlink in its folder leads outside the output folder"))
            continue
        jobs[name] = (out_dir / rel, urllib.parse.quote(url, safe=_URL_SAFE))
    summary.total = len(coco.images)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries([target for target, _ in jobs.values()])

    fetcher = _Fetcher(retries=retries, timeout=float(timeout), backoff=float(backoff),
                       max_backoff=float(max_backoff), max_bytes=max_bytes,
                       allow_private_addresses=allow_private_addresses)
    bar = tqdm(total=len(jobs), desc="download", unit="img", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty())
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        futures = {pool.submit(fetcher.fetch, target, url): (name, url) for name, (target, url) in jobs.items()}
        for future in as_completed(futures):
            name, url = futures[future]
            status, detail = future.result()
            if status == "skipped":
                summary.skipped += 1
            elif status == "downloaded":
                summary.downloaded += 1
                summary.bytes += detail
            else:
                summary.failures.append((name, url, detail))
                bar.set_postfix(failed=summary.failed, refresh=False)
            bar.update(1)
    except BaseException:
        # Ctrl+C: stop the workers at their next wait; finished files are already in place
        fetcher.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)

    summary.failures.sort()
    summary.failures_csv = _write_failures(out_dir / FAILURES_CSV, summary.failures)
    summary.seconds = time.monotonic() - start
    return summary


class _Fetcher:
    """One image: skip if already good, else GET with retries, verify, write atomically. Thread-safe."""

    def __init__(self, retries: int, timeout: float, backoff: float, max_backoff: float,
                 max_bytes: int = MAX_IMAGE_BYTES, allow_private_addresses: bool = False):
        self.retries, self.timeout, self.backoff, self.max_backoff = retries, timeout, backoff, max_backoff
        self.max_bytes = max_bytes
        self.stop = threading.Event()
        guards = () if allow_private_addresses else (_PublicHTTPHandler, _PublicHTTPSHandler)
        self.opener = urllib.request.build_opener(_HttpOnlyRedirects, *guards)
        self.headers = {"User-Agent": f"taxonomist/{__version__} (+python urllib)", "Accept": "image/*,*/*;q=0.5"}

    def fetch(self, target: Path, url: str) -> tuple[str, int | str]:
        """("skipped", 0), ("downloaded", nbytes) or ("failed", reason); never raises for network or disk trouble,
        so one bad file is one failure, not the end of the run."""
        reason = ""
        attempts = 0
        try:
            if target.is_file() and image_problem(target.read_bytes()) is None:
                return "skipped", 0
            for attempt in range(self.retries + 1):
                if self.stop.is_set():
                    raise _Stopped
                attempts += 1
                try:
                    data = self._get(url)
                    problem = image_problem(data)
                    if problem is not None:
                        # an HTML error page served with 200 is usually a transient CDN or proxy hiccup
                        raise _Retryable(f"not an image ({problem})")
                    atomic_write_bytes(target, data)
                    return "downloaded", len(data)
                except _Retryable as e:
                    reason, wait = e.reason, e.retry_after
                if attempt == self.retries:
                    break
                if wait is None:
                    wait = self.backoff * 2 ** attempt * random.uniform(0.5, 1.0)
                self.stop.wait(min(wait, self.max_backoff))
        except _Permanent as e:
            return "failed", e.reason
        except _Stopped:
            return "failed", "interrupted"
        except OSError as e:
            # the disk, not the network: full, read-only, a folder where the file should go
            return "failed", f"cannot write {target}: {e.strerror or e}"
        return "failed", f"{reason} (after {attempts} attempts)" if attempts > 1 else reason

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers=self.headers)
        expected = None
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.strip().isdigit() else None
                if expected is not None and expected > self.max_bytes:
                    raise _Permanent(f"refused: {expected} bytes is over the {self.max_bytes}-byte limit")
                data = self._read_capped(response)
        except urllib.error.HTTPError as e:
            retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            e.close()
            if e.code == 429 or e.code == 408 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {e.reason}", retry_after) from None
            raise _Permanent(f"HTTP {e.code} {e.reason}") from None
        except _RefusedAddress as e:  # checked before connecting through a proxy
            raise _Permanent(str(e)) from None
        except http.client.IncompleteRead as e:
            raise _Retryable(f"truncated body ({len(e.partial)} of {expected or '?'} bytes)") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, _RefusedAddress):
                raise _Permanent(str(e.reason)) from None
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g} s") from None
            if isinstance(e.reason, (ValueError, http.client.InvalidURL)):
                raise _Permanent(f"invalid URL ({e.reason})") from None
            raise _Retryable(f"connection failed ({e.reason})") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection error ({type(e).__name__}: {e})") from None
        except ValueError as e:
            raise _Permanent(f"invalid URL ({e})") from None
        if expected is not None and len(data) != expected:
            raise _Retryable(f"truncated body ({len(data)} of {expected} bytes)")
        return data

    def _read_capped(self, response) -> bytes:
        """The body, read in pieces so that one without (or with a lying) Content-Length stops at the cap."""
        chunks, total = [], 0
        while True:
            chunk = response.read(min(1 << 20, self.max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_bytes:
                raise _Permanent(f"refused: the body is over the {self.max_bytes}-byte limit")


def _unwritable_name(rel) -> str | None:
    """Why a relative path cannot be written (a name over NAME_MAX bytes, a lone surrogate), or None."""
    for i, part in enumerate(rel.parts):
        limit = NAME_MAX - _TEMP_OVERHEAD if i == len(rel.parts) - 1 else NAME_MAX
        try:
            size = len(os.fsencode(part))
        except UnicodeEncodeError:
            return f"refused: the name {shorten(part, 40)} has characters a file name cannot hold"
        if size > limit:
            return (f"refused: the name {shorten(part, 40)} is {size} bytes, over the {limit}-byte limit of "
                    f"{'a file name' if i == len(rel.parts) - 1 else 'a folder name'}")
    return None


def image_problem(data: bytes) -> str | None:
    """None when `data` decodes fully as an image, else why not (an HTML page, a truncated file, …).

    >>> image_problem(b"<html>Service unavailable</html>")
    'cannot identify image file'
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()      # checksums and structure, without decoding
        with Image.open(io.BytesIO(data)) as im:
            im.load()        # the pixels themselves: catches a body cut short
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e).split(" <_io.", 1)[0]
        return message or type(e).__name__
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _remove_stale_temporaries(targets: list[Path]) -> None:
    """Delete `.NAME.xxxx.tmp` files that a killed run left beside the files it was writing."""
    wanted: dict[Path, set[str]] = {}
    for target in targets:
        wanted.setdefault(target.parent, set()).add(target.name)
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                # atomic_path names temporaries ".<final name>.<random>.tmp"
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                    final = entry.name[1:-4].rsplit(".", 1)[0]
                    if final in names:
                        Path(entry.path).unlink(missing_ok=True)


def _write_failures(path: Path, failures: list[tuple[str, str, str]]) -> Path | None:
    """Write the failures CSV, or remove a stale one when this run had none."""
    if not failures:
        path.unlink(missing_ok=True)
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "url", "reason"])
    # a name from the COCO file may hold a lone surrogate (valid JSON, not UTF-8): written as \udXXX
    writer.writerows([[v.encode("utf-8", "backslashreplace").decode("utf-8") for v in row] for row in failures])
    return atomic_write_text(path, buf.getvalue())
