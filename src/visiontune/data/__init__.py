"""Datasets in, checked images and split tables out: sources, safe image loading, manifests.

Submodules: `images` (inspect/open any image safely), `manifest` (the CSV/JSON tables
between stages), `sources` (folder, CSV, archive, URL → manifest), `split` (train/valid).
Import them by name: this package imports none, so `fetch` stays light (no torch) and
`visiontune predict` does not load pandas.
"""
