"""Readers of kernel state (/proc, /sys, netlink) returning plain data; no metric shaping here."""
