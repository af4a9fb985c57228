"""An HTTP server on 127.0.0.1 for download tests: started on a free port in a thread, stopped on leaving."""

import contextlib
import http.server
import threading


@contextlib.contextmanager
def local_http_server(handler, **state):
    """Serve ``handler`` (a request handler class or a partial of one) on 127.0.0.1; the server carries ``state``
    as attributes, plus ``requests`` and ``base`` (its URL)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for key, value in {"requests": [], **state}.items():
        setattr(httpd, key, value)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
