"""Downloads through a fake opener: success, resume, checksum, offline."""

import gzip
import hashlib
import io
import urllib.error

import pytest

from flax_eprop.data import (
  BASE_URL,
  ChecksumError,
  DatasetNotFoundError,
  fetch,
  resolve_data_dir,
)

PAYLOAD = b'pretend this is an HDF5 file' * 1000
GZ = gzip.compress(PAYLOAD)
URL = f'{BASE_URL}/shd_train.h5.gz'


class _Response(io.BytesIO):
  def __init__(self, body, status=200):
    super().__init__(body)
    self.status = status
    self.headers = {'Content-Length': str(len(body))}


class FakeServer:
  """An opener serving `files` by URL; records the requests it gets."""

  def __init__(self, files, honour_range=True, offline=False):
    self.files, self.honour_range, self.offline = files, honour_range, offline
    self.requests = []

  def __call__(self, request, timeout=None):
    self.requests.append((request.full_url, request.get_header('Range')))
    if self.offline:
      raise urllib.error.URLError(
        '[Errno -3] Temporary failure in name resolution'
      )
    body = self.files[request.full_url]
    span = request.get_header('Range')
    if span and self.honour_range:
      start = int(span.removeprefix('bytes=').rstrip('-'))
      return _Response(body[start:], status=206)
    return _Response(body)


def _server(gz=GZ, md5=None, **kw):
  md5 = md5 or hashlib.md5(gz).hexdigest()
  sums = f'{md5}  shd_train.h5.gz\n0123  shd_test.h5.gz\n'.encode()
  return FakeServer({f'{BASE_URL}/md5sums.txt': sums, URL: gz}, **kw)


def test_download_verifies_and_decompresses(tmp_path):
  server = _server()
  path = fetch(
    'shd', 'train', data_dir=tmp_path, urlopen=server, progress=False
  )
  assert path == tmp_path / 'shd_train.h5'
  assert path.read_bytes() == PAYLOAD
  assert sorted(p.name for p in tmp_path.iterdir()) == ['shd_train.h5']
  assert [u for u, _ in server.requests] == [f'{BASE_URL}/md5sums.txt', URL]
  # present now: no network at all
  offline = _server(offline=True)
  assert fetch('shd', 'train', data_dir=tmp_path, urlopen=offline) == path
  assert offline.requests == []


@pytest.mark.parametrize('honour_range', [True, False])
def test_resumes_a_partial_download(tmp_path, honour_range):
  (tmp_path / 'shd_train.h5.gz.part').write_bytes(GZ[:100])
  server = _server(honour_range=honour_range)
  path = fetch(
    'shd', 'train', data_dir=tmp_path, urlopen=server, progress=False
  )
  assert path.read_bytes() == PAYLOAD
  assert server.requests[-1] == (URL, 'bytes=100-')


def test_checksum_mismatch(tmp_path):
  server = _server(md5='0' * 32)
  with pytest.raises(ChecksumError) as info:
    fetch('shd', 'train', data_dir=tmp_path, urlopen=server, progress=False)
  message = str(info.value)
  assert f'has MD5 {hashlib.md5(GZ).hexdigest()}' in message
  assert f'lists {"0" * 32}' in message and URL in message
  assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_no_published_checksum(tmp_path):
  server = FakeServer({f'{BASE_URL}/md5sums.txt': b'abc  other.gz\n', URL: GZ})
  with pytest.raises(ChecksumError, match='lists no checksum for shd_train'):
    fetch('shd', 'train', data_dir=tmp_path, urlopen=server, progress=False)
  assert [u for u, _ in server.requests] == [f'{BASE_URL}/md5sums.txt']


def test_offline_error_says_what_where_and_how(tmp_path):
  with pytest.raises(DatasetNotFoundError) as info:
    fetch('ssc', 'valid', data_dir=tmp_path, urlopen=_server(offline=True))
  message = str(info.value)
  target = tmp_path / 'ssc_valid.h5'
  assert message.startswith(f'ssc_valid.h5 not found: looked for {target}')
  assert 'name resolution' in message
  url = f'{BASE_URL}/ssc_valid.h5.gz'
  assert f'curl -L -o {target}.gz {url} && gunzip {target}.gz' in message
  assert 'FLAX_EPROP_DATA' in message and 'md5sums.txt' in message


def test_download_false_never_opens(tmp_path):
  server = _server()
  with pytest.raises(DatasetNotFoundError, match=r'download=False'):
    fetch('shd', 'test', data_dir=tmp_path, download=False, urlopen=server)
  assert server.requests == []


def test_corrupt_gzip_is_an_error(tmp_path):
  with pytest.raises(DatasetNotFoundError, match='shd_train.h5 not found'):
    fetch(
      'shd', 'train', data_dir=tmp_path, urlopen=_server(gz=b'not gzip'),
      progress=False,
    )  # fmt: skip
  assert not (tmp_path / 'shd_train.h5').exists()


def test_unknown_split():
  with pytest.raises(ValueError, match='SHD has no validation split'):
    fetch('shd', 'valid')


def test_data_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAX_EPROP_DATA', str(tmp_path))
  assert resolve_data_dir() == tmp_path
  assert resolve_data_dir(tmp_path / 'x') == tmp_path / 'x'
  monkeypatch.delenv('FLAX_EPROP_DATA')
  assert resolve_data_dir().parts[-2:] == ('.cache', 'flax_eprop')
