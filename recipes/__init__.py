"""Training recipes: SHD/SSC (and any file in their layout) with e-prop or BPTT.

Run ``python -m recipes.shd --workdir DIR`` from the repository root; see
`recipes.shd` and `recipes.config.Config` for the options.
"""
