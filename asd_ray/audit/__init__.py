"""Audit: reads run outputs only (split tables, metrics) and reports on them."""
