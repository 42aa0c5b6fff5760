"""Datasets in, checked images and split tables out. No submodule is imported here, so that
`fetch` stays light (no torch) and `visiontune predict` does not load pandas."""
