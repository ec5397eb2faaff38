"""Data for the app, the examples and the tests: the bundled digits, CIFAR-10 from a local file,
synthetic images, and image folders. The engine never imports this package.
"""
