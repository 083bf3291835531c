"""The built documentation site, opened in headless Chromium (the Debian package, no browser
download): the index, the `cam.explain` API page and a tutorial render, with every image they
show served, and no console error. Screenshots go to docs/_build/screenshots/.

The site is built by `bash docs/build.sh` (which runs this file after building); without a
build this file is skipped, naming the command.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading

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


def _chromium(url, *args, tmp):
  """(exit status, stdout, stderr) of one headless Chromium run on `url`; its console messages
  are logged to stderr (`--enable-logging=stderr`)."""
  cmd = [
    _browser(),
    '--headless',
    '--no-sandbox',  # CI runs as root
    '--disable-gpu',
    '--disable-dev-shm-usage',
    '--hide-scrollbars',
    f'--user-data-dir={tmp}',
    '--enable-logging=stderr',
    '--v=0',
    '--virtual-time-budget=5000',  # let the theme's scripts run before the dump / screenshot
    *args,
    url,
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  return r.returncode, r.stdout, r.stderr


def console_errors(stderr: str) -> list[str]:
  """Console messages in Chromium's log. Headless Chromium logs every console message as a
  `CONSOLE` line without its level, so any message counts: the site's pages log nothing when
  they work (uncaught exceptions and failed loads are logged the same way)."""
  return [line.strip() for line in stderr.splitlines() if ':CONSOLE' in line or 'Uncaught' in line]


@pytest.fixture(scope='module')
def site():
  if not os.path.isfile(os.path.join(SITE, 'index.html')):
    pytest.skip('the site is not built: bash docs/build.sh')
  server = _Server(SITE)
  yield server
  server.close()


def test_the_console_check_sees_an_error(tmp_path):
  """The check below can fail: a page that logs an error and throws is caught."""
  (tmp_path / 'bad.html').write_text(
    '<html><body><p>x</p><script>console.error("broken on purpose");'
    'throw new Error("thrown on purpose");</script></body></html>'
  )
  server = _Server(str(tmp_path))
  try:
    _, _, err = _chromium(server.url + 'bad.html', '--dump-dom', tmp=str(tmp_path / 'profile'))
  finally:
    server.close()
  errors = console_errors(err)
  assert any('broken on purpose' in e for e in errors), err[-2000:]
  assert any('thrown on purpose' in e for e in errors), err[-2000:]


@pytest.mark.parametrize('page', sorted(PAGES))
def test_page_renders_with_its_images_and_no_console_error(site, page, tmp_path):
  text, min_images = PAGES[page]
  os.makedirs(SHOTS, exist_ok=True)
  shot = os.path.join(SHOTS, page.replace('/', '_').replace('.html', '.png'))
  site.requests.clear()
  rc, dom, err = _chromium(site.url + page, '--dump-dom', tmp=str(tmp_path / 'a'))
  assert rc == 0, err[-2000:]
  assert text in dom, f'{page}: "{text}" not in the rendered page'
  assert not console_errors(err), console_errors(err)
  # Every image of the rendered page was served (none missing, none broken by a bad path).
  images = [s for s in re.findall(r'<img[^>]*\ssrc="([^"]+)"', dom) if not s.startswith('data:')]
  inline = len(re.findall(r'<img[^>]*\ssrc="data:image/', dom))
  assert len(images) + inline >= min_images, (page, images)
  status = {}
  for path, code in site.requests:
    status[path.split('?')[0]] = code
  failed = [p for p, c in status.items() if c >= 400]
  assert not failed, f'{page}: requests failed: {failed}'
  base = os.path.dirname(page)
  for src in images:
    local = os.path.normpath(os.path.join(SITE, base, src.split('?')[0]))
    assert os.path.isfile(local), f'{page}: image {src} is not in the site'
  rc, _, err = _chromium(
    site.url + page, f'--screenshot={shot}', '--window-size=1280,1600', tmp=str(tmp_path / 'b')
  )
  assert rc == 0 and os.path.getsize(shot) > 10_000, err[-2000:]
  assert not console_errors(err), console_errors(err)
