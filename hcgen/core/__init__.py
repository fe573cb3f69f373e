"""The paper, numpy and OpenCV only: the methods, their directions (Eq. 6-7), the search (Sec. 4.3) and PASS (Eq. 1-4)."""
