"""Storage plumbing shared by readers and stores: LMDB environments."""
