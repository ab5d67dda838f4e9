"""pytest collects the doctests of these pages (``--doctest-rst``), not the build's files.

The tutorial scripts run top to bottom when imported (sphinx-gallery executes them while the
pages are built), so neither they nor the copies the build writes are collected.
"""

collect_ignore = ["conf.py", "_gallery.py"]
collect_ignore_glob = ["tutorials/*", "generated/*", "_build/*", "api/*"]
