"""raylm's `cai` backend for Cloudera Machine Learning (not implemented yet)."""
