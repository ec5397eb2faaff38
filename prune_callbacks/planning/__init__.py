"""Pure planning over plain data: channel importance criteria, FLOPs-target allocation, and the
plans (`PrunePlan`) that record what was pruned. Never touches a live network's weights.
"""
