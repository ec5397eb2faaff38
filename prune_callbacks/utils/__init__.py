"""Small helpers every layer may use: atomic file writes and the network's train/eval mode.

Imports nothing else of the package.
"""
