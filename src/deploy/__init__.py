"""Deployment: MindIR export of the cascade and a runner for edge apps."""
