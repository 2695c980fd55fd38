"""Sub-commands of the ``diffcore`` command line that import heavy modules lazily."""
