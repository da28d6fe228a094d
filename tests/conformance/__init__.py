"""Conformance of the emulator (and our client) with Huawei's official Python SDK."""
