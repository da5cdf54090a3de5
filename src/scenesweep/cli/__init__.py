"""The command line: thin click wrappers over the drivers, one module per area."""
