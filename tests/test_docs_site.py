"""The built documentation site, opened in headless Chromium (the Debian package, no browser
download): the index, the `cam.explain` API page and a tutorial render, with every image they
show served, and no console error. Screenshots go to docs/_build/screenshots/.

The site is built by `bash docs/build.sh` (which runs this file after building); without a
build this file is skipped, naming the command.
"""

import base64
import functools
import http.server
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, 'docs', '_build', 'html')
SHOTS = os.path.join(ROOT, 'docs', '_build', 'screenshots')
# Each page with what it must show: a piece of its text, and how many images at least.
PAGES = {
  'index.html': ('dualsig-jax', 1),
  'api/cam.html': ('dualsig_jax.cam.explain', 0),
  'tutorials/explain_your_model.html': ('One call, several methods', 1),
}


def _browser():
  for name in ('chromium', 'chromium-browser'):
    if shutil.which(name):
      return shutil.which(name)
  pytest.fail('no Chromium: apt-get install chromium (Debian package)')


class _Server:
  """The site over HTTP on a free local port, remembering every request and its status."""

  def __init__(self, root):
    self.requests = []
    server = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def log_request(self, code='-', size='-'):
        server.requests.append((self.path, int(code) if str(code).isdigit() else 0))

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(Handler, directory=root)
    )
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


class _DevTools:
  """Headless Chromium driven over its DevTools protocol (a websocket, spoken here with the
  standard library): the console messages with their levels, uncaught exceptions, failed
  loads, the page's images as the browser decoded them, and screenshots."""

  def __init__(self, profile: str):
    self.proc = subprocess.Popen(
      [
        _browser(),
        '--headless',
        '--no-sandbox',  # CI runs as root
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--hide-scrollbars',
        '--remote-debugging-port=0',
        f'--user-data-dir={profile}',
        'about:blank',
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    deadline = time.monotonic() + 60
    url = None
    while url is None and time.monotonic() < deadline:
      line = self.proc.stderr.readline()
      if not line and self.proc.poll() is not None:
        break
      m = re.search(r'DevTools listening on (ws://\S+)', line)
      url = m.group(1) if m else None
    if url is None:
      self.proc.kill()
      pytest.fail('Chromium did not open its DevTools port')
    threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain the log
    host, port, path = re.match(r'ws://([^:/]+):(\d+)(/.*)', url).groups()
    self.sock = socket.create_connection((host, int(port)), timeout=60)
    key = base64.b64encode(os.urandom(16)).decode()
    self.sock.sendall(
      (
        f'GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n'
        f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n'
      ).encode()
    )
    head = b''
    while b'\r\n\r\n' not in head:
      head += self.sock.recv(1)
    assert head.startswith(b'HTTP/1.1 101'), head
    self.next_id, self.events, self.session = 0, [], None
    target = self.call('Target.createTarget', url='about:blank')['targetId']
    self.session = self.call('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
    for domain in ('Page', 'Runtime', 'Log', 'Network'):
      self.call(f'{domain}.enable')

  def _send(self, text: str) -> None:
    data = text.encode()
    n = len(data)
    head = bytes([0x81])
    if n < 126:
      head += bytes([0x80 | n])
    elif n < 1 << 16:
      head += bytes([0x80 | 126]) + struct.pack('>H', n)
    else:
      head += bytes([0x80 | 127]) + struct.pack('>Q', n)
    mask = os.urandom(4)
    self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

  def _exact(self, n: int) -> bytes:
    buf = b''
    while len(buf) < n:
      chunk = self.sock.recv(n - len(buf))
      if not chunk:
        raise ConnectionError('DevTools connection closed')
      buf += chunk
    return buf

  def _receive(self) -> dict:
    parts = []
    while True:
      b0, b1 = self._exact(2)
      n = b1 & 0x7F
      if n == 126:
        n = struct.unpack('>H', self._exact(2))[0]
      elif n == 127:
        n = struct.unpack('>Q', self._exact(8))[0]
      parts.append(self._exact(n))
      if b0 & 0x80:
        return json.loads(b''.join(parts))

  def call(self, method: str, **params) -> dict:
    self.next_id += 1
    msg = {'id': self.next_id, 'method': method, 'params': params}
    if self.session:
      msg['sessionId'] = self.session
    self._send(json.dumps(msg))
    while True:
      reply = self._receive()
      if reply.get('id') == self.next_id:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply.get('result', {})
      self.events.append(reply)

  def open(self, url: str, settle: float = 2.0) -> None:
    """Navigates and waits for the load event, then `settle` seconds for the page's scripts."""
    self.events.clear()
    self.call('Page.navigate', url=url)
    deadline = time.monotonic() + 60
    while not any(e.get('method') == 'Page.loadEventFired' for e in self.events):
      if time.monotonic() > deadline:
        pytest.fail(f'{url} did not load within 60 s')
      self.events.append(self._receive())
    self.call(
      'Runtime.evaluate',
      expression=f'new Promise(r => setTimeout(r, {int(settle * 1000)}))',
      awaitPromise=True,
    )

  def evaluate(self, expression: str):
    return self.call('Runtime.evaluate', expression=expression, returnByValue=True)['result'].get(
      'value'
    )

  def problems(self) -> list[str]:
    """Console errors and warnings, uncaught exceptions, error log entries (failed loads)."""
    out = []
    for e in self.events:
      m, p = e.get('method'), e.get('params', {})
      if m == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert', 'warning'):
        out.append(
          f'console.{p["type"]}: '
          + ' '.join(str(a.get('value', a.get('description'))) for a in p.get('args', []))
        )
      elif m == 'Runtime.exceptionThrown':
        d = p.get('exceptionDetails', {})
        out.append(f'uncaught: {d.get("exception", {}).get("description", d.get("text"))}')
      elif m == 'Log.entryAdded' and p.get('entry', {}).get('level') == 'error':
        out.append(f'log: {p["entry"].get("text")} {p["entry"].get("url", "")}')
    return out

  def screenshot(self, path: str, width: int = 1280, height: int = 1600) -> None:
    self.call(
      'Emulation.setDeviceMetricsOverride',
      width=width,
      height=height,
      deviceScaleFactor=1,
      mobile=False,
    )
    data = self.call('Page.captureScreenshot', format='png')['data']
    with open(path, 'wb') as f:
      f.write(base64.b64decode(data))

  def close(self) -> None:
    try:
      self.sock.close()
    finally:
      self.proc.kill()
      self.proc.wait(timeout=30)


@pytest.fixture(scope='module')
def site():
  if not os.path.isfile(os.path.join(SITE, 'index.html')):
    pytest.skip('the site is not built: bash docs/build.sh')
  server = _Server(SITE)
  yield server
  server.close()


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
  b = _DevTools(str(tmp_path_factory.mktemp('chromium_profile')))
  yield b
  b.close()


def test_the_checks_see_a_broken_page(browser, tmp_path):
  """The checks below can fail: an error logged, an exception thrown and a missing image on
  a page are all caught, and a console.log is not mistaken for an error."""
  (tmp_path / 'bad.html').write_text(
    '<html><body><p>x</p><img src="missing.png"><script>console.log("fine");'
    'console.error("broken on purpose"); throw new Error("thrown on purpose");</script>'
    '</body></html>'
  )
  server = _Server(str(tmp_path))
  try:
    browser.open(server.url + 'bad.html', settle=0.5)
    problems = browser.problems()
    images = browser.evaluate(_IMAGES)
  finally:
    server.close()
  assert any('broken on purpose' in p for p in problems), problems
  assert any('thrown on purpose' in p for p in problems), problems
  assert any('missing.png' in p for p in problems), problems
  assert not any('fine' in p for p in problems), problems
  assert images == [[server.url + 'missing.png', False]]


# Every <img> of the page with whether the browser decoded it (loaded and non-empty).
_IMAGES = 'Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])'


@pytest.mark.parametrize('page', sorted(PAGES))
def test_page_renders_with_its_images_and_no_console_error(site, browser, page):
  text, min_images = PAGES[page]
  browser.open(site.url + page)
  assert text in browser.evaluate('document.documentElement.outerHTML'), f'{page}: no "{text}"'
  images = browser.evaluate(_IMAGES)
  assert len(images) >= min_images, (page, images)
  assert all(ok for _, ok in images), (
    f'{page}: images not shown: {[s for s, ok in images if not ok]}'
  )
  assert not browser.problems(), browser.problems()
  os.makedirs(SHOTS, exist_ok=True)
  browser.screenshot(os.path.join(SHOTS, page.replace('/', '_').replace('.html', '.png')))
