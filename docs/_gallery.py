"""sphinx-gallery helpers of the astrotrunc docs (named by string in conf.py, so that the
configuration stays picklable)."""


def tight_matplotlib_scraper(block, block_vars, gallery_conf, **kwargs):
    """sphinx-gallery's matplotlib scraper, saving with ``bbox_inches="tight"``: no clipped axis
    labels, and legends placed outside the axes stay in the image."""
    from sphinx_gallery.scrapers import matplotlib_scraper

    return matplotlib_scraper(block, block_vars, gallery_conf, bbox_inches="tight", **kwargs)
