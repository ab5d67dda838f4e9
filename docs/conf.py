# Sphinx configuration for astrotrunc, built on the sphinx-astropy defaults (pydata theme,
# numpydoc, automodapi, doctestplus), with sphinx-gallery (the tutorial, executed at build time)
# and sphinx-argparse (the CLI reference, generated from astrotrunc.cli's parser).
#
# The build needs no network: intersphinx is off unless ASTROTRUNC_DOCS_INTERSPHINX=1, so links
# to astropy/numpy/... render as plain text offline. Build with
#
#     tox -e docs          (or: cd docs && python -m sphinx -W -b html . _build/html)
#
# Set ASTROTRUNC_DOCS_RUN_TUTORIALS=0 to build without running the tutorial (no figures).

import datetime
import importlib.util
import os
import sys

from sphinx_astropy.conf.v2 import *  # noqa: F401,F403
from sphinx_astropy.conf.v2 import intersphinx_mapping as _astropy_intersphinx

_here = os.path.dirname(os.path.abspath(__file__))  # the build may run from any directory
sys.path.insert(0, os.path.dirname(_here))
sys.path.insert(0, _here)  # _gallery.py
import astrotrunc  # noqa: E402

# sphinx-astropy lists a few optional extensions (sphinx-copybutton, ...): use those installed
extensions = [ext for ext in extensions  # noqa: F405
              if importlib.util.find_spec(ext.split(".")[0]) is not None]
# required (the docs extra): a missing one is an import error, not a silently thinner site
extensions += ["sphinx_gallery.gen_gallery", "sphinxarg.ext"]

# -- Project -----------------------------------------------------------------------------------
project = "astrotrunc"
author = "astrotrunc developers"
copyright = f"{datetime.date.today().year}, {author}"
release = astrotrunc.__version__
version = release.split("+")[0]

# -- General -----------------------------------------------------------------------------------
root_doc = master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "tutorials"]
default_role = "obj"
nitpicky = False

if os.environ.get("ASTROTRUNC_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = dict(_astropy_intersphinx)
    intersphinx_mapping.update({
        "astropy": ("https://docs.astropy.org/en/stable/", None),
        "healpy": ("https://healpy.readthedocs.io/en/latest/", None),
        "photutils": ("https://photutils.readthedocs.io/en/stable/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    })
else:
    intersphinx_mapping = {}

# automodapi: graphviz's ``dot`` is not assumed to be installed
automodapi_inheritance_diagram = False
automodsumm_inherited_members = False

# -- HTML --------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"astrotrunc {version}"
html_static_path = []
html_theme_options = {
    "collapse_navigation": True,
    "navigation_depth": 2,
    "show_nav_level": 2,
    "use_edit_page_button": False,
    "icon_links": [],
}
html_last_updated_fmt = "%d %b %Y"

# -- CLI reference (sphinx-argparse) ------------------------------------------------------------
# argparse wraps usage lines to $COLUMNS: keep them inside the page's code blocks
os.environ["COLUMNS"] = "72"

# -- Tutorials (sphinx-gallery) ----------------------------------------------------------------
# docs/tutorials/plot_*.py run at build time; their figures and printed values are the page.
# The output (docs/generated/) is not under version control.
sphinx_gallery_conf = {
    "examples_dirs": "tutorials",
    "gallery_dirs": "generated/tutorials",
    "filename_pattern": r"/plot_",
    "plot_gallery": os.environ.get("ASTROTRUNC_DOCS_RUN_TUTORIALS", "1") != "0",
    "abort_on_example_error": True,      # a failing tutorial fails the build
    "only_warn_on_example_error": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "ignore_repr_types": r"matplotlib[\w.]*\.(Legend|Text|Figure|Axes|AxesImage)\b|numpy\.ndarray",
    "image_scrapers": ("_gallery.tight_matplotlib_scraper",),
    "reset_modules": ("matplotlib",),
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 0,
    "show_memory": False,
    "backreferences_dir": None,
    "write_computation_times": True,
}


# -- Check: every public name has an API page -------------------------------------------------
def _check_public_api(app, env):
    """Warn (an error under -W) for every name of astrotrunc.__all__ without an API entry."""
    from sphinx.util import logging

    documented = set(env.get_domain("py").objects)
    missing = [n for n in astrotrunc.__all__ if f"astrotrunc.{n}" not in documented]
    if missing:
        logging.getLogger(__name__).warning(
            "public names of astrotrunc.__all__ missing from the API reference (docs/api.rst): "
            + ", ".join(missing))


def setup(app):
    app.connect("env-check-consistency", _check_public_api)
