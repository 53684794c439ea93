"""One module per collector; each registers itself with ``exporter.collector.register``.

Every module here is imported by ``load_collectors``, so adding a file adds a
collector and its ``--collector.<name>`` / ``--no-collector.<name>`` flags.
"""
