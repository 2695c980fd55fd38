"""diffcore's version and the version of the plugin contract it offers."""

from __future__ import annotations

#: diffcore's version (the distribution's, kept equal to pyproject.toml's)
__version__ = "0.2.0"

#: the plugin contract's version, the major.minor series of ``__version__``. A plugin pins the series
#: it was built for (``diffcore>=0.2,<0.3``); one whose requirement excludes this diffcore is
#: reported as failed and not imported.
PLUGIN_API = "0.2"
