"""Table 1 of the paper (Sec. 5.2): the protocol as a stage graph (protocol) and its results (results)."""
