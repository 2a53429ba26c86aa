"""Local training of clients: the client round every engine drives, the per-batch loss, the
local optimizers and augmentation."""
