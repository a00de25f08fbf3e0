"""Old import paths, kept so that models pickled before the package moved still load.

Pickles name classes and graph functions by module path; new code imports from
`sparsefx.channels` and `sparsefx.sparse` instead."""
