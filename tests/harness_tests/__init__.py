"""Tests of the real-sockets test harness itself."""
