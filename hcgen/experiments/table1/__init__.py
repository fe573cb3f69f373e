"""Table 1 of the paper (Sec. 5.2): the protocol as a stage graph (protocol), its time (estimate), its results (results)."""
