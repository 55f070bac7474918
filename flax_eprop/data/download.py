"""Locating and downloading the SHD and SSC files.

The files are looked for in the data directory: the ``data_dir`` argument, else
the environment variable ``FLAX_EPROP_DATA``, else ``~/.cache/flax_eprop``.
A missing file is downloaded, when ``download=True``, from the Zenke lab's
dataset page (:data:`BASE_URL`) as ``<file>.h5.gz``, with a progress bar, into
``<file>.h5.gz.part`` (an interrupted download resumes from there with an HTTP
``Range`` request), checked against the MD5 listed for it in the page's
``md5sums.txt`` (fetched from the same location at download time: this module
holds no checksum table of its own), then decompressed to a temporary name and
renamed, so a file that exists is always complete. Any failure is an error that
names the file, where it was looked for, and the commands that fetch it by hand;
there is never a fallback to other data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flax_eprop.data._deps import require

BASE_URL = 'https://zenkelab.org/datasets'
CHECKSUM_FILE = 'md5sums.txt'
ENV_VAR = 'FLAX_EPROP_DATA'
SPLITS = {'shd': ('train', 'test'), 'ssc': ('train', 'valid', 'test')}
_CHUNK = 1 << 20

UrlOpen = Callable[..., object]


class DatasetNotFoundError(FileNotFoundError):
  """A dataset file is absent and could not be downloaded."""


class ChecksumError(OSError):
  """A downloaded file does not match its published checksum."""


def resolve_data_dir(path=None) -> Path:
  """The directory that holds the data files and caches.

  Args:
    path: an explicit directory; None uses ``$FLAX_EPROP_DATA``, else
      ``~/.cache/flax_eprop``.

  Returns:
    The directory (not created).

  Examples:
    >>> resolve_data_dir('/data/spikes').as_posix()
    '/data/spikes'
  """
  if path is not None:
    return Path(path).expanduser()
  env = os.environ.get(ENV_VAR)
  if env:
    return Path(env).expanduser()
  return Path('~/.cache/flax_eprop').expanduser()


def file_name(name: str, split: str) -> str:
  """The file name of a split, e.g. ``'shd_train.h5'``.

  Args:
    name: ``'shd'`` or ``'ssc'``.
    split: one of ``SPLITS[name]``.

  Examples:
    >>> file_name('ssc', 'valid')
    'ssc_valid.h5'
  """
  if name not in SPLITS:
    raise ValueError(
      f'unknown dataset {name!r}; expected one of {list(SPLITS)}'
    )
  if split not in SPLITS[name]:
    raise ValueError(
      f'{name!r} has no split {split!r}; its splits are {list(SPLITS[name])}'
      + (' (SHD has no validation split: hold out part of train).')
      * (name == 'shd')
    )
  return f'{name}_{split}.h5'


def _manual(target: Path, lead: str = 'Fetch it by hand') -> str:
  gz, url = f'{target}.gz', f'{BASE_URL}/{target.name}.gz'
  return (
    f'{lead}:\n'
    f'  mkdir -p {target.parent} && curl -L -o {gz} {url} && gunzip {gz}\n'
    f'(MD5 checksums: {BASE_URL}/{CHECKSUM_FILE}), or pass data_dir= / set '
    f'{ENV_VAR} to a directory that holds {target.name}.'
  )


def fetch(
  name: str,
  split: str,
  *,
  data_dir=None,
  download: bool = True,
  urlopen: UrlOpen | None = None,
  progress: bool = True,
) -> Path:
  """Returns the path of a split's ``.h5`` file, downloading it if absent.

  Args:
    name: ``'shd'`` or ``'ssc'``.
    split: ``'train'``, ``'test'`` (and ``'valid'`` for SSC).
    data_dir: the directory (default: see :func:`resolve_data_dir`).
    download: if False, a missing file is an error without a download.
    urlopen: the opener, ``urlopen(request, timeout=...)`` returning a
      response with ``read(n)``, ``status`` and ``headers``; default
      ``urllib.request.urlopen`` (tests pass a fake).
    progress: show a progress bar while downloading.

  Returns:
    The path of the complete, verified, decompressed file.

  Raises:
    DatasetNotFoundError: the file is absent and could not be downloaded;
      the message says where it was looked for and how to fetch it by hand.
    ChecksumError: the download does not match ``md5sums.txt``.
  """
  target = resolve_data_dir(data_dir) / file_name(name, split)
  if target.is_file():
    return target
  if not download:
    raise DatasetNotFoundError(
      f'{target.name} not found: looked for {target} (download=False).\n'
      + _manual(target)
    )
  opener = urlopen or urllib.request.urlopen
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    md5 = _published_md5(opener, f'{target.name}.gz')
    gz = _download(opener, target, md5, progress)
    _gunzip(gz, target)
  except ChecksumError:
    raise
  except (OSError, EOFError) as err:  # URLError, timeouts, disk, bad gzip
    raise DatasetNotFoundError(
      f'{target.name} not found: looked for {target}, and downloading '
      f'{BASE_URL}/{target.name}.gz failed ({err}).\n' + _manual(target)
    ) from err
  return target


def _published_md5(opener: UrlOpen, gz_name: str) -> str:
  url = f'{BASE_URL}/{CHECKSUM_FILE}'
  with opener(urllib.request.Request(url), timeout=60) as response:
    text = response.read().decode('utf-8', 'replace')
  for line in text.splitlines():
    parts = line.split()
    if len(parts) == 2 and parts[1].lstrip('*').removeprefix('./') == gz_name:
      return parts[0].lower()
  raise ChecksumError(
    f'{url} lists no checksum for {gz_name}; not downloading.'
  )


def _download(opener: UrlOpen, target: Path, md5: str, progress: bool) -> Path:
  url = f'{BASE_URL}/{target.name}.gz'
  gz = target.with_name(f'{target.name}.gz')
  part = target.with_name(f'{target.name}.gz.part')
  offset = part.stat().st_size if part.is_file() else 0
  headers = {'Range': f'bytes={offset}-'} if offset else {}
  with opener(urllib.request.Request(url, headers=headers), timeout=60) as r:
    if getattr(r, 'status', 200) != 206:
      offset = 0  # the server ignored the range: start again
    size = r.headers.get('Content-Length')
    total = offset + int(size) if size else None
    _copy(r, part, offset, total, gz.name, progress)
  got = _md5(part)
  if got != md5:
    part.unlink()
    raise ChecksumError(
      f'{gz.name} from {url} has MD5 {got}, but {BASE_URL}/{CHECKSUM_FILE} '
      f'lists {md5}; the partial file was deleted. '
      + _manual(target, 'Try again, or fetch it by hand')
    )
  os.replace(part, gz)
  return gz


def _copy(response, part: Path, offset, total, desc: str, progress: bool):
  tqdm = require('tqdm').tqdm
  bar = tqdm(
    total=total,
    initial=offset,
    unit='B',
    unit_scale=True,
    desc=desc,
    disable=not progress,
  )
  with bar, open(part, 'ab' if offset else 'wb') as out:
    while chunk := response.read(_CHUNK):
      out.write(chunk)
      bar.update(len(chunk))


def _md5(path: Path) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _gunzip(gz: Path, target: Path) -> None:
  tmp = target.with_name(f'{target.name}.tmp-{os.getpid()}')
  try:
    with gzip.open(gz, 'rb') as src, open(tmp, 'wb') as dst:
      shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
  gz.unlink()
