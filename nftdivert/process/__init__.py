"""Plumbing for processes: children that die with us and say when they are ready,
lock files the kernel lets go of, namespaces entered by file descriptor.

The bottom layer: it imports nothing of nftdivert but errors, so every layer may use it.
"""
