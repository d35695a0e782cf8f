"""The ``edgelm`` command: thin modules that parse flags, call a function, print."""
