# Sphinx configuration for astrotrunc, built on the sphinx-astropy defaults (pydata theme,
# numpydoc, automodapi, doctestplus).
#
# The build needs no network: intersphinx is off unless ASTROTRUNC_DOCS_INTERSPHINX=1, so links
# to astropy/numpy/... render as plain text offline. Build with
#
#     cd docs && python -m sphinx -b html . _build/html

import datetime
import importlib.util
import os
import sys

from sphinx_astropy.conf.v2 import *  # noqa: F401,F403
from sphinx_astropy.conf.v2 import intersphinx_mapping as _astropy_intersphinx

sys.path.insert(0, os.path.abspath(".."))
import astrotrunc  # noqa: E402

# sphinx-astropy lists a few optional extensions (sphinx-copybutton, ...): use those installed
extensions = [ext for ext in extensions  # noqa: F405
              if importlib.util.find_spec(ext.split(".")[0]) is not None]

# -- Project -----------------------------------------------------------------------------------
project = "astrotrunc"
author = "astrotrunc developers"
copyright = f"{datetime.date.today().year}, {author}"
release = astrotrunc.__version__
version = release.split("+")[0]

# -- General -----------------------------------------------------------------------------------
root_doc = master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
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
