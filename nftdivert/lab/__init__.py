"""Throwaway network namespaces and process trees: the sandbox a sample runs in."""
