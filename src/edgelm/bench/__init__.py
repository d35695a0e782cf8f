"""Measurement: benchmark runs, statistics, stored history and reports."""
