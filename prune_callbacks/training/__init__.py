"""What training needs after surgery: the optimizer rebuilt over shrunk parameters, and the
collectives and DataParallel rebuild for several processes.
"""
