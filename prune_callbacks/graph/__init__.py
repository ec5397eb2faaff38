"""The channel graph: trace a network's program (`tracing`), follow channels through each op
(`ops`), route shuffled channels (`routes`), and build coupled groups (`channels`).
"""
