"""The Prometheus exporter, in four modules by job:

* :mod:`pytracer.exporter.families`: pure, one scrape's reads in, metric families out;
* :mod:`pytracer.exporter.collector`: the Collector doing those reads (and the background leak scan);
* :mod:`pytracer.exporter.webconfig`: the web config file, validated, and the TLS and basic auth built from it;
* :mod:`pytracer.exporter.web`: the HTTP server.

:class:`ExportError` is the layer's one error type, here so that collector
and web need not import each other.
"""


class ExportError(RuntimeError):
    """The exporter cannot start as asked; the message is one line."""
