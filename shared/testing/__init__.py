"""Harnesses that run real components on this machine for integration, end-to-end and chaos runs.

Nothing here is imported by the services; tests and run scripts import what they need.
"""
