"""``diffcore doctor``: a job's preflight, each check in a module of its own (data fit in
:mod:`diffcore.data.crops`, optional packages, the cache estimate, one measured train step)."""
