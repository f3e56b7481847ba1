"""Memory: the plan of what a run holds per rank (``lf-train plan=true``), and what it holds when measured."""
