"""A run from start to finish, in the driver process: the round loop, its loggers and threads."""
