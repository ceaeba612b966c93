"""Test helpers that run real servers (RTSP, ...)."""
