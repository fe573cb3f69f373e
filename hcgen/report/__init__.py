"""Self-contained HTML reports: the pieces (html), the gallery of a generation, the page of a Table 1 work folder."""
